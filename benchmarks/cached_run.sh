# Sourced by the benchmark scripts. `run NAME COMMAND...` runs COMMAND with `--output $out/NAME`
# unless that run folder already holds a results.json (runs are deterministic for a seed on CPU),
# so an interrupted script resumes where it stopped. Needs $out.
# LANE=i/n (optional) runs only every n-th row starting at row i (0-based), so n copies of one
# script with LANE=0/n ... LANE=(n-1)/n share its rows as parallel single-thread jobs.
# ONLY="NAME..." (optional) runs only the rows of those names.
# RECORD=DIR (optional) keeps each finished row's results.json in DIR/NAME/ (up to 50 KiB, no
# checkpoint: a folder to commit, since runs/ is lost with the machine) and skips a row recorded
# there, unless it is called as `NEEDED=1 run ...`: a checkpoint later rows start from.
_row=0
run() {
  local name=$1
  shift
  local lane=${LANE:-0/1}
  local row=$_row
  _row=$((_row + 1))
  if [ $((row % ${lane#*/})) -ne "${lane%/*}" ]; then
    return 0
  fi
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
    return 0
  fi
  local record=${RECORD:+$RECORD/$name/results.json}
  if [ -f "$out/$name/results.json" ]; then
    echo "$name: done already"
  elif [ -n "$record" ] && [ -f "$record" ] && [ -z "${NEEDED:-}" ]; then
    echo "$name: recorded in $RECORD"
  else
    "$@" --output "$out/$name"
  fi
  if [ -n "$record" ] && [ ! -f "$record" ] && [ -f "$out/$name/results.json" ]; then
    mkdir -p "${record%/*}"
    cp "$out/$name/results.json" "$record.tmp"
    mv "$record.tmp" "$record"
  fi
}

# task_recipe TASK: sets the array `recipe` to the GLUE recipe every benchmark script shares
# (lr 1e-4, batch 32, len 128 by default; seed 42; SST-2 a seeded 10k subset for 2 epochs = 626
# steps, other tasks their full train sets for 3 epochs; `epochs` is set too). Needs $data.
task_recipe() {
  recipe=(--task "$1" --data-dir "$data" --seed 42 --no-progress)
  if [ "$1" = sst2 ]; then
    epochs=2
    recipe+=(--train-samples 10000)
  else
    epochs=3
  fi
  recipe+=(--epochs "$epochs")
}
