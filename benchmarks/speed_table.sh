#!/usr/bin/env bash
# The README speed table: factorlab bench for runtime (eager PyTorch, ONNX Runtime float32, ONNX
# Runtime int8) x param_ratio (1 = the dense MiniLM, 0.5, 0.25; low-rank, factorized without
# training: speed does not depend on the weights' values) x batch (1, 32), seq 128, 2 threads,
# 20 interleaved runs. Resumable: a bench whose JSON exists is skipped. Time it on an otherwise
# idle machine (no other job: two multi-threaded jobs stall each other).
# Usage: bash benchmarks/speed_table.sh OUT_DIR
# then:  python benchmarks/speed_table.py OUT_DIR --write README.md
set -euo pipefail
out=${1:-runs/speed}
export HF_HUB_OFFLINE=1
mkdir -p "$out"
for p in 0.5 0.25; do
  [ -d "$out/low-rank-$p" ] || factorlab compress --param-ratio $p --output "$out/low-rank-$p" --no-progress
done
for variant in "torch" "onnxruntime" "onnxruntime --int8"; do
  tag=$(echo "$variant" | tr -d ' -')
  for model in dense low-rank-0.5 low-rank-0.25; do
    json="$out/$model.$tag.json"
    [ -f "$json" ] && continue
    path=()
    [ "$model" = dense ] || path=("$out/$model")
    factorlab bench "${path[@]}" --runtime $variant --batch-sizes 1,32 --threads 2 --no-memory \
      --json "$json"  # written atomically: a killed bench leaves no JSON
  done
done
