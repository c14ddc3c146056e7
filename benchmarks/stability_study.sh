#!/usr/bin/env bash
# Stability of staged vs simultaneous factorization (METHODS.md §4, Gupta et al. 2024 Fig. 3-4):
# low-rank at param_ratio 0.25 on RTE and MRPC, Monarch at 0.25 on RTE, each with 5 seeds, with
# all of the training data (high-data) and with a seeded 10% of it (low-data).
#
# Usage:
#   bash benchmarks/stability_study.sh [OUT_DIR] [STUDY ...]     (GLUE_DIR defaults to ../shared/data/glue)
#   STUDY: rte-high rte-low mrpc-high mrpc-low monarch-rte-high monarch-rte-low (default: all, in
#   this order). Every run is cached under OUT_DIR/<study>/runs/, so rerunning the same command
#   after an interruption only runs what is missing. Each study writes OUT_DIR/<study>/
#   stability.json and stability.png; the script ends with a table of all studies.
#
# Reduced recipe for a 2-core CPU (the full 3-epoch recipe would take days): the embedded
# all-MiniLM-L6-v2 (6 blocks, so 6 stages + a final phase), learning rate 1e-4, batch 32, max
# length 128, warm-up 10%; high-data: full train set, 2 epochs (RTE 156 steps, MRPC 230);
# low-data: 10% of the train set (drawn with each run's seed), 6 epochs (RTE 48 steps,
# MRPC 72), so each stage still gets 6-10 steps. Override with EPOCHS_HIGH / EPOCHS_LOW / SEEDS.
#
# Run time: the comparison sweep (benchmarks/sweep_comparison.yaml) measured, per optimizer step
# with OMP_NUM_THREADS=1 and two such jobs sharing the 2 cores, RTE 3.0 s and MRPC 2.0 s (mean over
# its runs). So one run is ~8 min high-data and ~3 min low-data, 10 runs per study, and all six
# studies take ~5.3 h of one such job: ~2.7 h when run as two parallel jobs, e.g.
#   OMP_NUM_THREADS=1 bash benchmarks/stability_study.sh runs/stability rte-high rte-low monarch-rte-low &
#   OMP_NUM_THREADS=1 bash benchmarks/stability_study.sh runs/stability mrpc-high mrpc-low monarch-rte-high
set -euo pipefail
out=${1:-runs/stability}
shift || true
studies=("$@")
[ ${#studies[@]} -eq 0 ] && studies=(rte-high rte-low mrpc-high mrpc-low monarch-rte-high monarch-rte-low)
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
  recipe=(--method "$method" --param-ratio 0.25 --task "$task" --data-dir "$data" --seeds "$seeds"
          --max-seq-length 128 --batch-size 32 --learning-rate 1e-4 --no-progress)
  case $amount in
    high) recipe+=(--epochs "${EPOCHS_HIGH:-2}") ;;
    low) recipe+=(--train-fraction 0.1 --epochs "${EPOCHS_LOW:-6}") ;;
    *) echo "unknown study $study" >&2; exit 2 ;;
  esac
  echo "== $study: ${recipe[*]}"
  factorlab stability "${recipe[@]}" --output "$out/$study"
done

python - "$out" "${studies[@]}" <<'EOF'
import json, sys
from pathlib import Path
out, studies = Path(sys.argv[1]), sys.argv[2:]
print("| study | schedule | failed | dev main metric of the others (%) |")
print("|---|---|---|---|")
for study in studies:
    summary = json.loads((out / study / "stability.json").read_text())
    for name, s in summary["schedules"].items():
        ok = s["num_runs"] - s["num_failed"]
        value = "-" if s["mean"] is None else f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} (n={ok})"
        print(f"| {study} | {name} | {s['num_failed']}/{s['num_runs']} | {value} |")
EOF
