#!/usr/bin/env bash
# Regenerates every section of benchmarks/RESULTS.md, one benchmark after the other
# (never in parallel: they would slow each other down).
#
# Usage (from anywhere, with the project's venv active):
#   benchmarks/run_all.sh           # full runs (about 15-20 minutes on a 2-core CPU)
#   benchmarks/run_all.sh --quick   # smaller runs, for scripts that support --quick
#   benchmarks/run_all.sh --gpu     # also the GPU case of bench_vs_cohen.py (needs a GPU)
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
QUICK=()
GPU=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=(--quick) ;;
    --gpu) GPU=1 ;;
    *) echo "unknown argument: $arg (allowed: --quick, --gpu)" >&2; exit 2 ;;
  esac
done

run() {
  echo "== $*" >&2
  local start=$SECONDS
  "$PYTHON" "$@" --write > /dev/null
  echo "   done in $((SECONDS - start)) s" >&2
}

run benchmarks/bench_samplers.py
run benchmarks/bench_bounds.py "${QUICK[@]}"
run benchmarks/bench_mixed_tightness.py "${QUICK[@]}"
# bench_certify_overhead.py has no --quick; a smaller n stands in for it.
if [ ${#QUICK[@]} -gt 0 ]; then
  run benchmarks/bench_certify_overhead.py --n 10000 --repeats 3
else
  run benchmarks/bench_certify_overhead.py
fi
run benchmarks/bench_many_inputs.py "${QUICK[@]}"
run benchmarks/bench_vs_cohen.py "${QUICK[@]}"
run benchmarks/bench_scaling.py "${QUICK[@]}"
run benchmarks/bench_sequential.py "${QUICK[@]}"
# bench_bilateral.py has no --quick; the first 60 images stand in for it.
if [ ${#QUICK[@]} -gt 0 ]; then
  run benchmarks/bench_bilateral.py --max 60
else
  run benchmarks/bench_bilateral.py
fi
if [ "$GPU" = 1 ]; then
  run benchmarks/bench_vs_cohen.py --gpu "${QUICK[@]}"
fi
"$PYTHON" benchmarks/summarize.py  # the README's performance paragraph, from RESULTS.md
echo "Wrote benchmarks/RESULTS.md and README.md's performance paragraph" >&2
