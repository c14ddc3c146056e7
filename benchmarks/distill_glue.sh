#!/usr/bin/env bash
# Distillation during recovery (the training-engine issue): dense MiniLM vs low-rank and act-svd
# at param_ratio 0.5, each fine-tuned with and without distillation from the dense model of the
# same task (METHODS.md §10: alpha 0.5, T 2; "-hidden" adds the per-block hidden-state MSE,
# weight 1). Same recipe and seed as benchmarks/core_glue.sh (lr 1e-4, batch 32, len 128, seed
# 42; SST-2 a seeded 10k subset for 2 epochs, MRPC the full train set for 3 epochs), so every row
# of a task takes the same optimizer steps on the same batches. Rows:
#   TASK-METHOD-0.5[-kd]   factorize the pretrained MiniLM, then fine-tune (the core table's way)
#   TASK-METHOD-0.5-ft-kd  factorize the dense model fine-tuned on TASK, then recover with
#                          distillation from it (fine-tune -> compress -> recover)
#   ...-hidden-lr2e-4      the same with hidden-state distillation and learning rate 2e-4
#   TASK-act-svd-0.5-ft    act-svd from the fine-tuned model, recovered without distillation
#   TASK-act-svd-0.5-ft-kd-LEVER  one lever changed on the best start: a0.9 (alpha 0.9), t1 / t4
#                          (temperature), lr2e-4 / lr5e-5 (learning rate), hidden (hidden MSE),
#                          a1 (distillation alone), and pairs of them
#   TASK-act-svd-sens-...  the same with --allocation sensitivity
#   TASK-dense-sS, TASK-act-svd-0.5-ft-kd-a0.9-sS  the best row repeated with seed S (SEEDS,
#                          default "43 44"): its own dense model (the seed draws SST-2's subset,
#                          so each pair shares subset, steps and batches) and its student
# A run whose results.json exists is kept (runs are deterministic for a seed on CPU), so an
# interrupted script resumes; rows are ordered by priority. Usage, one job per task in parallel:
#   OMP_NUM_THREADS=1 bash benchmarks/distill_glue.sh OUT_DIR TASK...
# then: factorlab report OUT_DIR
set -euo pipefail
out=${1:-runs/distill}
shift || true
tasks=("${@:-sst2 mrpc}")
data=${GLUE_DIR:-../shared/data/glue}
export HF_HUB_OFFLINE=1

. "$(dirname "$0")/cached_run.sh"  # run NAME COMMAND..., task_recipe TASK

for task in ${tasks[@]}; do
  task_recipe "$task"
  dense="$out/$task-dense"
  teacher=(--teacher "$dense")
  NEEDED=1 run "$task-dense" factorlab finetune "${recipe[@]}"
  lr=(factorlab compress "${recipe[@]}" --method low-rank --param-ratio 0.5)
  run "$task-low-rank-0.5" "${lr[@]}"
  run "$task-low-rank-0.5-kd" "${lr[@]}" "${teacher[@]}"
  run "$task-low-rank-0.5-ft-kd" "${lr[@]}" --model "$dense" "${teacher[@]}"
  # two levers at once beyond the default recipe: hidden-state distillation and a 2x learning rate
  run "$task-low-rank-0.5-ft-kd-hidden-lr2e-4" "${lr[@]}" --model "$dense" "${teacher[@]}" \
    --distill-hidden 1 --learning-rate 2e-4
  act=(factorlab compress "${recipe[@]}" --method act-svd --param-ratio 0.5)
  run "$task-act-svd-0.5-ft-kd" "${act[@]}" --model "$dense" "${teacher[@]}"
  run "$task-act-svd-0.5" "${act[@]}"
  run "$task-act-svd-0.5-kd" "${act[@]}" "${teacher[@]}"
  for method in low-rank act-svd; do
    compress=(factorlab compress "${recipe[@]}" --method "$method" --param-ratio 0.5)
    run "$task-$method-0.5-kd-hidden" "${compress[@]}" "${teacher[@]}" --distill-hidden 1
  done
  # one lever at a time on the best start (act-svd from the fine-tuned model, distilled from it):
  # the distillation weight alpha, the temperature T, the learning rate, hidden-state distillation
  ft_act=("${act[@]}" --model "$dense" "${teacher[@]}")
  run "$task-act-svd-0.5-ft" "${act[@]}" --model "$dense"  # the same start, no distillation
  run "$task-act-svd-0.5-ft-kd-a0.9" "${ft_act[@]}" --distill-alpha 0.9
  run "$task-act-svd-0.5-ft-kd-lr2e-4" "${ft_act[@]}" --learning-rate 2e-4
  run "$task-act-svd-0.5-ft-kd-hidden" "${ft_act[@]}" --distill-hidden 1
  run "$task-act-svd-0.5-ft-kd-t1" "${ft_act[@]}" --distill-temperature 1
  run "$task-act-svd-0.5-ft-kd-a0.9-lr2e-4" "${ft_act[@]}" --distill-alpha 0.9 --learning-rate 2e-4
  run "$task-act-svd-0.5-ft-kd-lr5e-5" "${ft_act[@]}" --learning-rate 5e-5
  run "$task-act-svd-0.5-ft-kd-t4" "${ft_act[@]}" --distill-temperature 4
  run "$task-act-svd-0.5-ft-kd-a0.9-lr5e-5" "${ft_act[@]}" --distill-alpha 0.9 --learning-rate 5e-5
  run "$task-act-svd-0.5-ft-kd-a1" "${ft_act[@]}" --distill-alpha 1
  # ranks from the allocation issue's sensitivity allocator (measured on the fine-tuned model)
  run "$task-act-svd-sens-0.5-ft-kd-a0.9" "${ft_act[@]}" --allocation sensitivity \
    --distill-alpha 0.9
  for seed in ${SEEDS:-43 44}; do
    seeded="$out/$task-dense-s$seed"
    run "$task-dense-s$seed" factorlab finetune "${recipe[@]}" --seed "$seed"
    run "$task-act-svd-0.5-ft-kd-a0.9-s$seed" "${act[@]}" --seed "$seed" --model "$seeded" \
      --teacher "$seeded" --distill-alpha 0.9
  done
done
