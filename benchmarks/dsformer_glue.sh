#!/usr/bin/env bash
# DSFormer (METHODS.md §8) against low-rank on real GLUE, the same optimizer steps and batches for
# every row of a task; every compressed row starts from the dense MiniLM fine-tuned on the task
# (TASK-dense) and recovers with distillation from it (alpha 0.5, T 2), as benchmarks/lpaf_glue.sh:
#   TASK-dsformer-P-ft-kd        W ~ C D (s = 3/8 k non-zeros per row), the Straight-Through
#                                Factorizer: basis and latent coefficients trained on the task,
#                                top-s support refreshed every step, then deployed
#   TASK-dsformer-P-ft-kd-nostf  fit C D to W, then fine-tune the deployed form (fixed support)
#   TASK-low-rank-P-ft-kd        truncated SVD at the same parameters
#   TASK-low-rank-Q-ft-kd        truncated SVD at the same BYTES (DSFormer's int16 indices
#                                counted): Q = 0.579, 0.413, 0.323 for P = 0.5, 0.357, 0.28
# P = 0.5, 0.357, 0.28 are 2x, 2.8x and 3.57x compression of the targeted parameters.
# Recipe as benchmarks/core_glue.sh (SST-2: seeded 10k subset, 2 epochs = 626 steps; else 3
# epochs). Resumable. Usage: OMP_NUM_THREADS=1 [LANE=i/n] bash benchmarks/dsformer_glue.sh OUT TASK...
# (RATIOS="0.28" to run one ratio), then: factorlab report OUT
set -euo pipefail
out=${1:-runs/distill}
shift || true
tasks=("${@:-sst2}")
data=${GLUE_DIR:-../shared/data/glue}
export HF_HUB_OFFLINE=1

. "$(dirname "$0")/cached_run.sh"  # run NAME COMMAND..., task_recipe TASK

declare -A equal_bytes=([0.5]=0.579 [0.357]=0.413 [0.28]=0.323)
for task in ${tasks[@]}; do
  task_recipe "$task"
  dense="$out/$task-dense"
  if [ ! -f "$dense/results.json" ]; then
    NEEDED=1 LANE=0/1 run "$task-dense" factorlab finetune "${recipe[@]}"
  fi
  from=(--model "$dense" --teacher "$dense")
  for p in ${RATIOS:-0.28 0.357 0.5}; do
    q=${equal_bytes[$p]}
    ds=(factorlab compress "${recipe[@]}" "${from[@]}" --method dsformer --param-ratio "$p")
    run "$task-dsformer-$p-ft-kd" "${ds[@]}"
    run "$task-dsformer-$p-ft-kd-nostf" "${ds[@]}" --option stf=false
    lr=(factorlab compress "${recipe[@]}" "${from[@]}" --method low-rank)
    run "$task-low-rank-$p-ft-kd" "${lr[@]}" --param-ratio "$p"
    run "$task-low-rank-$q-ft-kd" "${lr[@]}" --param-ratio "$q"
  done
done
