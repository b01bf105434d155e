#!/usr/bin/env bash
# False alarms of `xytune compare` on this machine: one table against fresh re-runs of itself (same code,
# same machine), at the default alpha and threshold, at alpha 0.05, and after re-timing the suspects three
# rounds with base and re-run taking turns: by whole `xytune retime` calls (a call per table per round) and
# row by row (`--take-turns`, as the CI workflow does); the two re-timings alternate which goes first. Every
# regression reported here is a false alarm.
#
#   bash scripts/compare_false_alarms.sh [RUNS] [PROFILE ARGS...]     (default: 5 runs of a --quick profile)
set -euo pipefail
runs=${1:-5}
shift || true
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--device cpu --model smollm2-135m --quick)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
regressions() { sed -n 's/.*regressed: \([0-9]*\);.*/\1/p'; }

whole_calls() {  # $1 base, $2 re-run, $3 suspects
  for round in 1 2 3; do
    fresh=$([ "$round" = 1 ] && echo --fresh || true)
    xytune retime "$1" "$3" $fresh > /dev/null
    xytune retime "$2" "$3" $fresh > /dev/null
  done
  xytune compare "$1" "$2" | regressions || true
}

row_by_row() {  # $1 base, $2 re-run, $3 suspects, $4 a fresh folder for the FIFOs
  opts=(--fresh --rounds 3 --take-turns "$4")
  xytune retime "$1" "$3" "${opts[@]}" --first > /dev/null &
  xytune retime "$2" "$3" "${opts[@]}" > /dev/null
  wait $!
  xytune compare "$1" "$2" | regressions || true
}

echo "profiling the base table: xytune profile ${args[*]}"
xytune profile "${args[@]}" --no-progress -o "$dir/base.parquet" > /dev/null
printf '%-4s %5s %7s %11s %11s %9s %19s %17s\n' run rows "median" "regressed" "regressed" suspects \
  "after whole-call" "after row-by-row"
printf '%-4s %5s %7s %11s %11s %9s %19s %17s\n' "" "" ratio "(defaults)" "(a=0.05)" "" turns turns
for i in $(seq "$runs"); do
  xytune profile "${args[@]}" --no-progress -o "$dir/run$i.parquet" > /dev/null
  report=$(xytune compare "$dir/base.parquet" "$dir/run$i.parquet" --suspects "$dir/suspects$i.json" || true)
  rows=$(sed -n 's/.*rows compared: \([0-9]*\);.*/\1/p' <<< "$report")
  loose=$(xytune compare "$dir/base.parquet" "$dir/run$i.parquet" --alpha 0.05 | regressions || true)
  drift=$(sed -n 's/.*; median: \([0-9.]*\).*/\1/p' <<< "$report")
  suspects=$(python -c "import json,sys; print(len(json.load(open(sys.argv[1]))))" "$dir/suspects$i.json")
  for way in whole row; do
    cp "$dir/base.parquet" "$dir/$way-base$i.parquet"
    cp "$dir/run$i.parquet" "$dir/$way-run$i.parquet"
  done
  if [ $((i % 2)) = 1 ]; then
    whole=$(whole_calls "$dir/whole-base$i.parquet" "$dir/whole-run$i.parquet" "$dir/suspects$i.json")
    row=$(row_by_row "$dir/row-base$i.parquet" "$dir/row-run$i.parquet" "$dir/suspects$i.json" "$dir/turns$i")
  else
    row=$(row_by_row "$dir/row-base$i.parquet" "$dir/row-run$i.parquet" "$dir/suspects$i.json" "$dir/turns$i")
    whole=$(whole_calls "$dir/whole-base$i.parquet" "$dir/whole-run$i.parquet" "$dir/suspects$i.json")
  fi
  printf '%-4s %5s %7s %11s %11s %9s %19s %17s\n' "$i" "$rows" "$drift" "$(regressions <<< "$report")" "$loose" \
    "$suspects" "$whole" "$row"
done
