#!/usr/bin/env bash
# Stability of staged vs simultaneous factorization (METHODS.md §4, Gupta et al. 2024 Fig. 3-4):
# low-rank at param_ratio 0.25 on RTE and MRPC, Monarch at 0.25 on RTE, each with 5 seeds, with
# all of the training data (high-data) and with a seeded 10% of it (low-data); and low-rank and
# Monarch on a seeded 10% of SST-2, a task that the factorized model does learn in a short budget.
#
# Usage:
#   bash benchmarks/stability_study.sh [OUT_DIR] [STUDY ...]     (GLUE_DIR defaults to ../shared/data/glue)
#   STUDY: [monarch-]TASK-high or [monarch-]TASK-low, TASK one of rte mrpc sst2 (default:
#   rte-high rte-low mrpc-high mrpc-low monarch-rte-high monarch-rte-low sst2-low
#   monarch-sst2-low, in this order).
#   Every run is cached under OUT_DIR/<study>/runs/, so rerunning the same command after an
#   interruption only runs what is missing. Each study writes OUT_DIR/<study>/stability.json and
#   stability.png; the script ends with benchmarks/stability_summary.py's table of its studies.
#
# Reduced recipe for a 2-core CPU (the full 3-epoch recipe would take ~5 h of one job for the
# three high-data studies alone, by the times below): the embedded all-MiniLM-L6-v2 (6 blocks,
# so 6 stages + a final phase), learning rate 1e-4, batch 32, max length 128, warm-up 10%. Epochs per task (override with EPOCHS_HIGH / EPOCHS_LOW; SEEDS=5):
#   high-data, the full train set: MRPC 2 epochs (230 steps), RTE 1 (78 steps: an RTE step costs
#     1.7x an MRPC step, and the RTE studies had to fit one session), SST-2 1 (2,105 steps);
#   low-data, 10% of the train set drawn with each run's seed: RTE and MRPC 6 epochs (48 and 72
#     steps), SST-2 half an epoch (106 steps), so each stage gets 6-15 steps.
#
# Run time, measured on the 2-core machine with OMP_NUM_THREADS=1 and two such jobs at once
# (train_seconds in each stability.json): per run, simultaneous / staged, rte-high 3.0 / 3.5 min,
# rte-low 1.8 / 1.9 min, mrpc-high 5.3 / 6.1 min, mrpc-low 1.6 / 2.1 min, sst2-low 1.4 / 1.6 min.
# The RTE and MRPC studies took ~1.6 h as two parallel jobs (mrpc-low was already cached), each
# SST-2 study ~17 min:
#   OMP_NUM_THREADS=1 bash benchmarks/stability_study.sh runs/stability rte-high rte-low monarch-rte-high &
#   OMP_NUM_THREADS=1 bash benchmarks/stability_study.sh runs/stability mrpc-high mrpc-low monarch-rte-low
set -euo pipefail
out=${1:-runs/stability}
shift || true
studies=("$@")
[ ${#studies[@]} -eq 0 ] &&
  studies=(rte-high rte-low mrpc-high mrpc-low monarch-rte-high monarch-rte-low sst2-low
           monarch-sst2-low)
data=${GLUE_DIR:-../shared/data/glue}
seeds=${SEEDS:-5}
export HF_HUB_OFFLINE=1

for study in "${studies[@]}"; do
  case $study in
    monarch-*) method=monarch; rest=${study#monarch-} ;;
    *) method=low-rank; rest=$study ;;
  esac
  task=${rest%-*}
  amount=${rest##*-}
  case $task in
    rte) high=1 low=6 ;;
    mrpc) high=2 low=6 ;;
    sst2) high=1 low=0.5 ;;
    *) echo "unknown task in study $study (rte, mrpc or sst2)" >&2; exit 2 ;;
  esac
  recipe=(--method "$method" --param-ratio 0.25 --task "$task" --data-dir "$data" --seeds "$seeds"
          --max-seq-length 128 --batch-size 32 --learning-rate 1e-4 --no-progress)
  case $amount in
    high) recipe+=(--epochs "${EPOCHS_HIGH:-$high}") ;;
    low) recipe+=(--train-fraction 0.1 --epochs "${EPOCHS_LOW:-$low}") ;;
    *) echo "unknown study $study: it must end in -high or -low" >&2; exit 2 ;;
  esac
  echo "== $study: ${recipe[*]}"
  factorlab stability "${recipe[@]}" --output "$out/$study"
done

python "$(dirname "$0")/stability_summary.py" "$out" "${studies[@]}"
