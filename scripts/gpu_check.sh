#!/usr/bin/env bash
# Everything GPU in one run, on a machine with a CUDA GPU and no internet:
#   1. installs flashinfer from the wheels in .whl/ (see ../shared/GPU.md or README),
#   2. compiles the kernel variants the tests use, one process per test, in parallel
#      (flashinfer JIT-compiles each variant on first use: 15-110 s each),
#   3. runs the GPU tests, then the attention benchmark, and prints a short table last.
# Usage: bash scripts/gpu_check.sh [--quick]   (logs go to $OUT, or /tmp/seqattn-gpu)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/seqattn-gpu}
mkdir -p "$OUT"
quick=${1:-}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "installing .whl/*.whl failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1
export FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, flashinfer; print('torch', torch.__version__, 'flashinfer', flashinfer.__version__)"

start=$(date +%s)
mapfile -t nodes < <(python3 -m pytest -q --collect-only -m gpu tests/gpu -p no:cacheprovider | grep '::')
for node in "${nodes[@]}"; do
  log="$OUT/warm_$(echo "$node" | tr -c 'A-Za-z0-9_\n' '_').log"
  python3 -m pytest -q -x -p no:cacheprovider "$node" > "$log" 2>&1 &
done
wait
echo "compiled kernels for ${#nodes[@]} tests in $(( $(date +%s) - start )) s"

python3 -m pytest -q -m gpu -p no:cacheprovider -rs tests/gpu 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
bench_args=()
[ "$quick" = "--quick" ] && bench_args=(--quick)
python3 benchmarks/bench_attention.py "${bench_args[@]}" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

echo
echo "== summary =="
echo "GPU tests: $(tail -n 1 "$OUT/tests.log") (exit $tests_rc)"
grep -E '^\||copy bandwidth' "$OUT/bench.log"
echo "benchmark exit $bench_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
