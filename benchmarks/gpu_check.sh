#!/usr/bin/env bash
# The checks a session runs when it is lent a GPU machine (one call, ~7 minutes):
# versions, per-iteration speed at N = 1e6 (jaxem alone), the block reader's host -> GPU
# throughput and the streamed-vs-in-memory iteration, then the tests of the streamed,
# online, EM and GMM code on the GPU. Logs go to $OUT (or ./gpu-logs).
#   bash benchmarks/gpu_check.sh
set -u
out="${OUT:-gpu-logs}"
mkdir -p "$out"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
py=python3
start=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
} 2>&1 | tee "$out/env.log"
if [ -z "${SKIP_FIT:-}" ]; then
  timeout 120 $py benchmarks/bench_fit.py --n 1000000 --d 32 --k 32 --covariance full \
      --peers '' --no-x64 2>&1 | tee "$out/fit_full.log"
  timeout 90 $py benchmarks/bench_fit.py --n 1000000 --d 16 --k 16 --covariance diag \
      --peers '' --no-x64 2>&1 | tee "$out/fit_diag.log"
fi
timeout 200 $py benchmarks/bench_stream.py transfer --dir /tmp/jaxem-bench 2>&1 \
    | tee "$out/transfer.log"
timeout 150 $py benchmarks/bench_stream.py overhead --dir /tmp/jaxem-bench 2>&1 \
    | tee "$out/overhead.log"
left=$(( 420 - ($(date +%s) - start) ))
if [ "$left" -gt 60 ]; then
  timeout "$left" $py -m pytest -q -p no:cacheprovider -n 4 -rf tests/test_streamed.py \
      tests/test_online.py tests/test_em.py tests/test_gmm.py > "$out/tests.log" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$out/tests.log" | tail -n 20
fi
echo "total $(( $(date +%s) - start )) s" | tee -a "$out/env.log"
