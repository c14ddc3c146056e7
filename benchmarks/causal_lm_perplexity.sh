#!/usr/bin/env bash
# Perplexity of a factorized vs dense causal LM on real text. No pretrained decoder can be had
# offline here, so this trains one: a small LLaMA-shaped model (hidden 256, 4 layers, 4 heads /
# 2 KV heads, FFN 688; MiniLM's WordPiece vocabulary) on SST-2's training sentences, then
# compresses it offline (no fine-tuning) with low-rank and act-svd (calibrated on training
# sentences) at param_ratio 0.5 and scores SST-2's dev sentences with
# `factorlab evaluate --task perplexity` (sliding windows, seq-len 128, stride 64).
# Usage: OMP_NUM_THREADS=1 bash benchmarks/causal_lm_perplexity.sh OUT [STEPS, default 500 of 8 x 128 tokens]
set -euo pipefail
out=${1:?usage: causal_lm_perplexity.sh OUT [STEPS]}
steps=${2:-500}
data=${GLUE_DIR:-../shared/data/glue}
export HF_HUB_OFFLINE=1
mkdir -p "$out"
tail -n +2 "$data/SST-2/train.tsv" | cut -f1 > "$out/train.txt"
tail -n +2 "$data/SST-2/dev.tsv" | cut -f1 > "$out/dev.txt"

if [ ! -f "$out/dense/config.json" ]; then
  python - "$out" "$steps" <<'PY'
import math, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from factorlab.models import default_model_path, load_tokenizer

out, steps = sys.argv[1], int(sys.argv[2])
tokenizer = load_tokenizer(default_model_path())
tokenizer.model_max_length = 10**9
ids = tokenizer(open(f"{out}/train.txt").read(), return_tensors="pt").input_ids[0]
torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=tokenizer.vocab_size, hidden_size=256, intermediate_size=688,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, tie_word_embeddings=True,
)
model = LlamaForCausalLM(config)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=steps, pct_start=0.05)
batch, length = 8, 128
generator = torch.Generator().manual_seed(0)
start = time.perf_counter()
for step in range(steps):
    offsets = torch.randint(0, ids.numel() - length, (batch,), generator=generator)
    x = torch.stack([ids[o : o + length] for o in offsets])
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step(); schedule.step(); optimizer.zero_grad()
    if step % 100 == 0 or step == steps - 1:
        print(f"step {step} loss {loss.item():.3f} ppl {math.exp(loss.item()):.1f} "
              f"{time.perf_counter() - start:.0f} s", flush=True)
model.save_pretrained(f"{out}/dense")
tokenizer.save_pretrained(f"{out}/dense")
PY
fi

for method in low-rank act-svd; do
  if [ ! -f "$out/$method/results.json" ]; then
    calibration=()
    [ "$method" = act-svd ] && calibration=(--calibration-file "$out/train.txt" --calibration-samples 512)
    factorlab compress --model "$out/dense" --method "$method" --param-ratio 0.5 \
      "${calibration[@]}" --max-seq-length 128 --output "$out/$method" --no-progress
  fi
done
for model in dense low-rank act-svd; do
  factorlab evaluate "$out/$model" --task perplexity --text-file "$out/dev.txt" \
    --seq-len 128 --stride 64 --no-progress > "$out/$model.perplexity.json"
  python -c "import json,sys; m=json.load(open(sys.argv[1]))['metrics']; print(sys.argv[2], \
    f\"perplexity {m['perplexity']:.2f} over {m['tokens']} tokens\")" \
    "$out/$model.perplexity.json" "$model"
done
