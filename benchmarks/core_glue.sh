#!/usr/bin/env bash
# The README's core table: dense MiniLM vs low-rank at param_ratio 0.5 (and, on MRPC, Monarch and
# block-low-rank at the same parameters), each fine-tuned with the
# same recipe and seed, evaluated on the real GLUE dev sets. A run whose results.json exists is
# kept (runs are deterministic for a seed on CPU), so an interrupted script resumes. Usage:
#   bash benchmarks/core_glue.sh [OUT_DIR]      (GLUE_DIR defaults to ../shared/data/glue)
# then: factorlab report OUT_DIR
set -euo pipefail
out=${1:-runs/core}
data=${GLUE_DIR:-../shared/data/glue}
export HF_HUB_OFFLINE=1

. "$(dirname "$0")/cached_run.sh"  # run NAME COMMAND..., task_recipe TASK

for task in sst2 mrpc rte; do
  task_recipe "$task"  # SST-2's 67k sentences: a seeded 10k subset keeps it affordable on 2 cores
  run "$task-dense" factorlab finetune "${recipe[@]}"
  run "$task-low-rank-0.5" factorlab compress "${recipe[@]}" --method low-rank --param-ratio 0.5
done
# The first slice of the Monarch / block-low-rank comparison: the same recipe on MRPC.
mrpc=(--task mrpc --data-dir "$data" --seed 42 --no-progress --epochs 3 --param-ratio 0.5)
for method in monarch block-low-rank; do
  run "mrpc-$method-0.5" factorlab compress "${mrpc[@]}" --method "$method"
done
