#!/usr/bin/env bash
# Latency of DSFormer against dense and low-rank at 2x, 2.8x and 3.57x compression of the targeted
# parameters (the DSFormer issue), in eager PyTorch and ONNX Runtime, batch 1 and 32, seq 128,
# 2 threads, 20 interleaved runs against the dense model (`factorlab bench`). Latency depends on
# the shapes only, so the models are the pretrained MiniLM compressed without training
# (DSFormer fitted, `stf=false`); the trained rows of benchmarks/dsformer_glue.sh have the same
# layers. Rows: dsformer-P, low-rank-P (equal parameters), low-rank-Q (equal bytes: Q = 0.579,
# 0.413, 0.323 for P = 0.5, 0.357, 0.28). Resumable; time it on an otherwise idle machine.
# Usage: [BUILD_ONLY=1] bash benchmarks/dsformer_latency.sh OUT_DIR, then:
#   python benchmarks/deploy_summary.py OUT_DIR/bench
set -euo pipefail
out=${1:-runs/latency}
export HF_HUB_OFFLINE=1
mkdir -p "$out/bench"
declare -A equal_bytes=([0.5]=0.579 [0.357]=0.413 [0.28]=0.323)
models=()
for p in ${RATIOS:-0.5 0.357 0.28}; do
  if [ ! -f "$out/dsformer-$p/results.json" ]; then
    factorlab compress --method dsformer --param-ratio "$p" --option stf=false \
      --output "$out/dsformer-$p"
  fi
  for q in "$p" "${equal_bytes[$p]}"; do
    if [ ! -f "$out/low-rank-$q/results.json" ]; then
      factorlab compress --method low-rank --param-ratio "$q" --output "$out/low-rank-$q"
    fi
  done
  models+=("dsformer-$p" "low-rank-$p" "low-rank-${equal_bytes[$p]}")
done
if [ -n "${BUILD_ONLY:-}" ]; then  # compress only (the benches want an idle machine)
  exit 0
fi
for name in "${models[@]}"; do
  for runtime in torch onnxruntime; do
    json="$out/bench/$name.$runtime.bench.json"
    if [ ! -f "$json" ]; then
      factorlab bench "$out/$name" --runtime "$runtime" --batch-sizes 1,32 --threads 2 \
        --no-memory --json "$json"
    fi
  done
done
