#!/usr/bin/env bash
# Deployment: eager PyTorch vs ONNX Runtime, float32 vs dynamic int8, dense vs factorized, on the
# SST-2 models of benchmarks/distill_glue.sh and benchmarks/lpaf_glue.sh. For each model: SST-2 dev
# accuracy as deployed (`factorlab evaluate --runtime ...`), then latency against its dense
# reference in the same runtime (`factorlab bench --runtime ...`, batch 1 and 32, seq 128, 2
# threads, 20 interleaved runs). Time it on an otherwise idle machine.
# Usage: bash benchmarks/deploy_table.sh RUNS_DIR OUT_DIR MODEL... (run folder names in RUNS_DIR)
# then: python benchmarks/deploy_summary.py OUT_DIR
set -euo pipefail
runs=${1:-runs/distill}
out=${2:-runs/deploy}
shift 2 || true
models=("${@:-sst2-dense sst2-low-rank-0.5-ft-kd sst2-low-rank-0.25-ft-kd}")
data=${GLUE_DIR:-../shared/data/glue}
export HF_HUB_OFFLINE=1
mkdir -p "$out"
for name in ${models[@]}; do
  for variant in "torch" "onnxruntime" "onnxruntime --int8"; do
    tag=$(echo "$variant" | tr -d ' -')
    flags=(--runtime $variant)
    if [ ! -f "$out/$name.$tag.eval.json" ]; then
      factorlab evaluate "$runs/$name" --task sst2 --data-dir "$data" "${flags[@]}" \
        > "$out/$name.$tag.eval.json.tmp" && mv "$out/$name.$tag.eval.json.tmp" "$out/$name.$tag.eval.json"
    fi
    if [ ! -f "$out/$name.$tag.bench.json" ]; then
      factorlab bench "$runs/$name" "${flags[@]}" --batch-sizes 1,32 --threads 2 --no-memory \
        --json "$out/$name.$tag.bench.json"
    fi
  done
done
