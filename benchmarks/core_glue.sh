#!/usr/bin/env bash
# The README's core table: dense MiniLM vs low-rank at param_ratio 0.5, each fine-tuned with the
# same recipe and seed, evaluated on the real GLUE dev sets. Usage:
#   bash benchmarks/core_glue.sh [OUT_DIR]      (GLUE_DIR defaults to ../shared/data/glue)
# then: factorlab report OUT_DIR
set -euo pipefail
out=${1:-runs/core}
data=${GLUE_DIR:-../shared/data/glue}
export HF_HUB_OFFLINE=1
for task in sst2 mrpc rte; do
  recipe=(--task "$task" --data-dir "$data" --seed 42 --epochs 3 --no-progress)
  # SST-2 has 67k training sentences: a seeded 10k subset keeps a run near 10 minutes on 2 cores.
  [ "$task" = sst2 ] && recipe+=(--train-samples 10000 --epochs 2)
  factorlab finetune "${recipe[@]}" --output "$out/$task-dense"
  factorlab compress "${recipe[@]}" --method low-rank --param-ratio 0.5 --output "$out/$task-low-rank-0.5"
done
