#!/usr/bin/env bash
# LPAF (METHODS.md §7) against direct factorization on real GLUE, the same optimizer steps and
# batches for every row of a task. Every compressed row starts from the dense MiniLM fine-tuned on
# the task (TASK-dense) and recovers with distillation from it (alpha 0.5, T 2: the setting that
# helped most in benchmarks/distill_glue.sh), so rows differ only in how they compress:
#   TASK-low-rank-P-ft-kd        truncated SVD, then fine-tuning
#   TASK-act-svd-P-ft-kd         activation-aware SVD (512 calibration examples), then fine-tuning
#   TASK-lpaf-P-ft-kd            LPAF with our defaults: half the steps movement pruning to
#                                sparsity 0.5 (scores start at |W| / std W), the SVD of each pruned
#                                matrix at ranks allocated globally on the pruned spectra
#                                (relative errors), half the steps mixed-rank fine-tuning
#   ...-nomix / -em10            without mixed-rank training (q = 0) / with the sparsity-aware
#                                SVD (10 EM steps fitting only the kept entries)
#   ...-prune0.25                a quarter of the steps pruning, three quarters recovery
#   TASK-lpaf-P-pretrained-kd    LPAF as the paper runs it: movement pruning DURING the task's
#                                fine-tuning, from the pretrained MiniLM, for the dense recipe's
#                                steps, then as many steps of mixed-rank recovery (twice the
#                                epochs, half pruning): the dense fine-tuning plus the recovery of
#                                every other row, so the whole pipeline takes the same steps
#   ...-{zeroinit,maginit,magnitude}-abs-em10   the first setting tried (METHODS.md §7 as
#                                written): sparsity 1 - P, absolute-error allocation, 10 EM steps,
#                                movement scores from 0 / from |W|, or magnitude pruning
# Recipe as benchmarks/core_glue.sh: lr 1e-4, batch 32, len 128, seed 42; SST-2 a seeded 10k
# subset for 2 epochs (626 steps), MRPC and STS-B the full train sets for 3 epochs. SEED=N (not 42)
# trains the compressed rows with seed N into TASK-...-seedN folders, from the same seed-42 teacher.
# Resumable (finished rows are kept; RATIOS="0.25" runs one ratio; ONLY="ROW..." runs those rows only:
# name TASK-dense too where OUT lacks it; RECORD=benchmarks/records/distill skips the rows
# recorded there, benchmarks/cached_run.sh). Usage, two single-thread lanes sharing the rows:
#   OMP_NUM_THREADS=1 LANE=0/2 bash benchmarks/lpaf_glue.sh OUT TASK... &
#   OMP_NUM_THREADS=1 LANE=1/2 bash benchmarks/lpaf_glue.sh OUT TASK...
# then: factorlab report OUT; python benchmarks/lpaf_rank_study.py OUT
set -euo pipefail
out=${1:-runs/distill}
shift || true
tasks=("${@:-sst2}")
data=${GLUE_DIR:-../shared/data/glue}
export HF_HUB_OFFLINE=1

. "$(dirname "$0")/cached_run.sh"  # run NAME COMMAND..., task_recipe TASK

declare -A complement=([0.25]=0.75 [0.5]=0.5)
for task in ${tasks[@]}; do
  task_recipe "$task"
  dense="$out/$task-dense"
  if [ ! -f "$dense/results.json" ]; then
    NEEDED=1 LANE=0/1 run "$task-dense" factorlab finetune "${recipe[@]}"
  fi
  seed=${SEED:-42}
  s=""
  if [ "$seed" != 42 ]; then
    s="-seed$seed"
    recipe+=(--seed "$seed")
  fi
  for p in ${RATIOS:-0.25 0.5}; do
    from=(--model "$dense" --teacher "$dense" --param-ratio "$p")
    lpaf=(factorlab compress "${recipe[@]}" "${from[@]}" --method lpaf)
    first=("${lpaf[@]}" --sparsity "${complement[$p]}" --option allocation_normalize=false
      --option em_iterations=10)
    run "$task-lpaf-$p-ft-kd$s" "${lpaf[@]}"
    run "$task-low-rank-$p-ft-kd$s" factorlab compress "${recipe[@]}" "${from[@]}" --method low-rank
    run "$task-act-svd-$p-ft-kd$s" factorlab compress "${recipe[@]}" "${from[@]}" --method act-svd
    run "$task-lpaf-$p-ft-kd-nomix$s" "${lpaf[@]}" --mixed-rank-q 0
    run "$task-lpaf-$p-ft-kd-em10$s" "${lpaf[@]}" --option em_iterations=10
    run "$task-lpaf-$p-ft-kd-zeroinit-abs-em10$s" "${first[@]}" --option score_init=zeros
    run "$task-lpaf-$p-ft-kd-maginit-abs-em10$s" "${first[@]}"
    run "$task-lpaf-$p-ft-kd-magnitude-abs-em10$s" "${first[@]}" --pruning magnitude
    run "$task-lpaf-$p-ft-kd-prune0.25$s" "${lpaf[@]}" --option prune_fraction=0.25
    run "$task-lpaf-$p-pretrained-kd$s" factorlab compress "${recipe[@]}" --epochs "$((2 * epochs))" \
      --teacher "$dense" --param-ratio "$p" --method lpaf
  done
done
