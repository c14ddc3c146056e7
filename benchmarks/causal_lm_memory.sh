#!/usr/bin/env bash
# Peak memory of act-svd compression of a LLaMA-shaped random model of about 1.1B parameters
# (TinyLlama-1.1B's shape: hidden 2048, FFN 5632, 22 layers, 32 heads / 4 KV heads, vocabulary
# 32000; bf16), and the load time of its checkpoint. No real decoder can be had offline here, so
# the weights are random: this measures memory and time, not accuracy. Statistics stream block
# by block (factorize_ with a calibrate function); compare the maximum resident set with "model +
# one block's statistics (printed by the run) + 2 GB" (README, Causal LMs).
# Usage: OMP_NUM_THREADS=1 bash benchmarks/causal_lm_memory.sh OUT [SAMPLES] [SEQ_LEN] [--sequential]
# (--sequential swaps each block as soon as it is projected, freeing its dense weights)
set -euo pipefail
out=${1:?usage: causal_lm_memory.sh OUT [SAMPLES] [SEQ_LEN]}
samples=${2:-8}
seq_len=${3:-64}
mode=${4:-}
name=act-svd${mode:+-sequential}
export HF_HUB_OFFLINE=1
mkdir -p "$out"

if [ ! -f "$out/dense/config.json" ]; then
  python - "$out/dense" <<'PY'
import sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from factorlab.models import default_model_path, load_tokenizer

start = time.perf_counter()
config = LlamaConfig(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
    num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
)
torch.manual_seed(0)
with torch.device("cpu"):
    model = LlamaForCausalLM(config).to(torch.bfloat16)
print(f"built {sum(p.numel() for p in model.parameters()):,} parameters (bf16) in "
      f"{time.perf_counter() - start:.0f} s")
model.save_pretrained(sys.argv[1])
tokenizer = load_tokenizer(default_model_path())  # any tokenizer: ids < 30522 < 32000
tokenizer.save_pretrained(sys.argv[1])
PY
fi
# calibration text: the README, one example per line
grep -v '^\s*$' README.md > "$out/calibration.txt"

/usr/bin/time -v factorlab compress --model "$out/dense" --method act-svd --param-ratio 0.5 \
  --calibration-file "$out/calibration.txt" --calibration-samples "$samples" \
  --max-seq-length "$seq_len" --output "$out/$name" --overwrite --no-progress $mode \
  2> >(tee "$out/$name.time" >&2)
grep -E "Maximum resident|Elapsed" "$out/$name.time"
du -sh "$out/dense" "$out/$name"

python - "$out" "$name" <<'PY'
import sys, time
import torch
from transformers import AutoModelForCausalLM
import factorlab

out, name = sys.argv[1:3]
start = time.perf_counter()
model = factorlab.load(f"{out}/{name}")
print(f"factorlab.load of the {name} checkpoint: {time.perf_counter() - start:.1f} s, "
      f"dtype {next(model.parameters()).dtype}, {sum(p.numel() for p in model.parameters()):,} "
      "parameters")
del model
start = time.perf_counter()
dense = AutoModelForCausalLM.from_pretrained(f"{out}/dense")
print(f"transformers from_pretrained of the dense model: {time.perf_counter() - start:.1f} s, "
      f"dtype {next(dense.parameters()).dtype}")
PY
