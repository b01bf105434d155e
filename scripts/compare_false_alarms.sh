#!/usr/bin/env bash
# False alarms of `xytune compare` on this machine: one table against fresh re-runs of itself (same code,
# same machine), at the default alpha and threshold, at alpha 0.05, and after the CI workflow's re-timing of
# the suspects (three rounds, base and re-run taking turns row by row). Every regression reported here is a
# false alarm.
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

echo "profiling the base table: xytune profile ${args[*]}"
xytune profile "${args[@]}" --no-progress -o "$dir/base.parquet" > /dev/null
printf '%-4s %6s %13s %22s %20s %9s %24s\n' run rows "median ratio" "regressed (defaults)" \
  "regressed (a=0.05)" suspects "regressed after re-time"
for i in $(seq "$runs"); do
  xytune profile "${args[@]}" --no-progress -o "$dir/run$i.parquet" > /dev/null
  cp "$dir/base.parquet" "$dir/base$i.parquet"
  report=$(xytune compare "$dir/base$i.parquet" "$dir/run$i.parquet" --suspects "$dir/suspects$i.json" || true)
  rows=$(sed -n 's/.*rows compared: \([0-9]*\);.*/\1/p' <<< "$report")
  loose=$(xytune compare "$dir/base$i.parquet" "$dir/run$i.parquet" --alpha 0.05 | regressions || true)
  drift=$(sed -n 's/.*; median: \([0-9.]*\).*/\1/p' <<< "$report")
  suspects=$(python -c "import json,sys; print(len(json.load(open(sys.argv[1]))))" "$dir/suspects$i.json")
  # as the CI workflow: three rounds, row by row in turns, the first round replacing the samples
  opts=(--fresh --rounds 3 --take-turns "$dir/turns$i")
  xytune retime "$dir/base$i.parquet" "$dir/suspects$i.json" "${opts[@]}" --first > /dev/null &
  xytune retime "$dir/run$i.parquet" "$dir/suspects$i.json" "${opts[@]}" > /dev/null
  wait $!
  after=$(xytune compare "$dir/base$i.parquet" "$dir/run$i.parquet" | regressions || true)
  printf '%-4s %6s %13s %22s %20s %9s %24s\n' "$i" "$rows" "$drift" "$(regressions <<< "$report")" "$loose" \
    "$suspects" "$after"
done
