#!/usr/bin/env bash
# False alarms of `xytune compare` on this machine: one table against fresh re-runs of itself (same code,
# same machine), at the default alpha and threshold, at alpha 0.05, and after re-timing the suspects as the
# CI workflow does: base and re-run row by row in turns (`--take-turns`), in PAIRS fresh pairs of processes
# (the first replacing the samples; base and re-run take turns at going first). Every regression reported here is a false alarm. "held back" counts the
# rows the pooled samples alone would have flagged, but that were not slower in every process.
#
#   PAIRS=5 bash scripts/compare_false_alarms.sh [RUNS] [PROFILE ARGS...]  (default: 5 runs of a --quick profile)
set -euo pipefail
runs=${1:-5}
shift || true
pairs=${PAIRS:-5}
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--device cpu --model smollm2-135m --quick)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
regressions() { sed -n 's/.*regressed: \([0-9]*\);.*/\1/p'; }
held_back() { sed -n 's/.*so not counted: \([0-9]*\).*/\1/p'; }

retime_in_pairs() {  # $1 base, $2 re-run, $3 suspects, $4 a folder for the FIFOs
  for pair in $(seq "$pairs"); do
    fresh=$([ "$pair" = 1 ] && echo --fresh || true)
    base_first=$([ $((pair % 2)) = 1 ] && echo --first || true)
    run_first=$([ $((pair % 2)) = 0 ] && echo --first || true)
    xytune retime "$1" "$3" $fresh --take-turns "$4/$pair" $base_first > /dev/null &
    xytune retime "$2" "$3" $fresh --take-turns "$4/$pair" $run_first > /dev/null
    wait $!
  done
}

echo "profiling the base table: xytune profile ${args[*]}; re-timing in $pairs process pairs"
xytune profile "${args[@]}" --no-progress -o "$dir/base.parquet" > /dev/null
printf '%-4s %5s %7s %11s %11s %9s %16s %12s\n' run rows "median" "regressed" "regressed" suspects \
  "regressed after" "held back"
printf '%-4s %5s %7s %11s %11s %9s %16s %12s\n' "" "" ratio "(defaults)" "(a=0.05)" "" re-timing ""
for i in $(seq "$runs"); do
  xytune profile "${args[@]}" --no-progress -o "$dir/run$i.parquet" > /dev/null
  report=$(xytune compare "$dir/base.parquet" "$dir/run$i.parquet" --suspects "$dir/suspects$i.json" || true)
  rows=$(sed -n 's/.*rows compared: \([0-9]*\);.*/\1/p' <<< "$report")
  loose=$(xytune compare "$dir/base.parquet" "$dir/run$i.parquet" --alpha 0.05 | regressions || true)
  drift=$(sed -n 's/.*; median: \([0-9.]*\).*/\1/p' <<< "$report")
  suspects=$(python -c "import json,sys; print(len(json.load(open(sys.argv[1]))))" "$dir/suspects$i.json")
  cp "$dir/base.parquet" "$dir/base$i.parquet"
  retime_in_pairs "$dir/base$i.parquet" "$dir/run$i.parquet" "$dir/suspects$i.json" "$dir/turns$i"
  after=$(xytune compare "$dir/base$i.parquet" "$dir/run$i.parquet" || true)
  grep '^| gemm\|^| attention' <<< "$after" | sed "s/^/  run $i: /" >&2 || true  # the rows flagged, to look into
  printf '%-4s %5s %7s %11s %11s %9s %16s %12s\n' "$i" "$rows" "$drift" "$(regressions <<< "$report")" "$loose" \
    "$suspects" "$(regressions <<< "$after")" "$(held_back <<< "$after")"
done
