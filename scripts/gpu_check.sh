#!/usr/bin/env bash
# Everything GPU in one run, on a machine with a CUDA GPU and no internet:
#   1. installs flashinfer from the wheels in .whl/ (see ../shared/GPU.md or README),
#   2. compiles the kernel variants the tests use, one process per test, in parallel
#      (flashinfer JIT-compiles each variant on first use: 15-110 s each),
#   3. runs the GPU tests, then the benchmarks, and prints their tables last.
# Usage: bash scripts/gpu_check.sh [--quick]   (logs go to $OUT, or /tmp/seqattn-gpu)
#   BENCHES="attention prefix_cascade" picks benchmarks/bench_<name>.py (default: all);
#   BENCHES=none skips them; TESTS=tests/gpu/test_x.py narrows the tests;
#   BENCH_ARGS="--profile --skip generate_batch" passes its words to every benchmark.
#   Compiled kernels carried in .ficache/ are restored first (scripts/flashinfer_cache.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/seqattn-gpu}
mkdir -p "$OUT"
quick=${1:-}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "installing .whl/*.whl failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1
# kernels an earlier machine compiled (scripts/flashinfer_cache.py), when carried along
[ -d .ficache ] && python3 scripts/flashinfer_cache.py restore .ficache
export FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, flashinfer; print('torch', torch.__version__, 'flashinfer', flashinfer.__version__)"

start=$(date +%s)
TESTS=${TESTS:-tests/gpu}
mapfile -t nodes < <(python3 -m pytest -q --collect-only -m gpu $TESTS -p no:cacheprovider | grep '::')
for node in "${nodes[@]}"; do
  log="$OUT/warm_$(echo "$node" | tr -c 'A-Za-z0-9_\n' '_').log"
  python3 -m pytest -q -x -p no:cacheprovider "$node" > "$log" 2>&1 &
done
wait
echo "compiled kernels for ${#nodes[@]} tests in $(( $(date +%s) - start )) s"

python3 -m pytest -q -m gpu -p no:cacheprovider -rs $TESTS 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
read -r -a bench_args <<< "${BENCH_ARGS:-}"
[ "$quick" = "--quick" ] && bench_args+=(--quick)
benches=${BENCHES:-$(ls benchmarks/bench_*.py | grep -v -e bookkeeping -e scale | sed 's|.*bench_||; s|\.py||')}
[ "$benches" = none ] && benches=""
bench_rc=0
for name in $benches; do
  echo "== benchmarks/bench_$name.py =="
  python3 "benchmarks/bench_$name.py" "${bench_args[@]}" 2>&1 | tee "$OUT/bench_$name.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || bench_rc=$rc
done

echo
echo "== summary =="
echo "GPU tests: $(tail -n 1 "$OUT/tests.log") (exit $tests_rc)"
for name in $benches; do
  echo "-- bench_$name"
  grep -E '^\||copy bandwidth|heads|hit rate' "$OUT/bench_$name.log"
done
echo "benchmarks exit $bench_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
