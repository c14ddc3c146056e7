# Sourced by the benchmark scripts: `run NAME COMMAND...` runs COMMAND with `--output $out/NAME`
# unless that run folder already holds a results.json (runs are deterministic for a seed on CPU),
# so an interrupted script resumes where it stopped. Needs $out.
run() {
  local name=$1
  shift
  if [ -f "$out/$name/results.json" ]; then
    echo "$name: done already"
  else
    "$@" --output "$out/$name"
  fi
}
