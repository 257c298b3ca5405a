#!/usr/bin/env bash
# The checks a session runs when it is lent a GPU machine (one call, ~8 minutes): versions,
# the test suite on the GPU (all but the files that need the dev extras' notebook and lint
# tools, or that pin the CPU themselves), fit_batch and a fresh-process iris fit against
# scikit-learn on the same host, and per-iteration speed at N = 1e6. Logs go to $OUT (or
# ./gpu-logs); each step has its own time limit, so a slow step costs only its own rows.
#   TEST_S=240 bash benchmarks/gpu_check.sh   # the tests' limit, 300 s by default
set -u
out="${OUT:-gpu-logs}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
py=python3
start=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nproc
  $py -c "import jax, jaxlib, sklearn; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'sklearn', sklearn.__version__, jax.devices())"
} 2>&1 | tee "$out/env.log"
# The CLI tests need the `jaxem` command: an editable install from this tree, offline.
$py -m pip install -q --no-deps --no-index --no-build-isolation -e . > "$out/install.log" 2>&1 \
    || { echo "install failed"; tail -n 5 "$out/install.log"; }
timeout "${TEST_S:-300}" $py -m pytest -v -p no:cacheprovider -n 12 --dist worksteal -rfE \
    --durations=15 tests --ignore tests/test_notebooks.py --ignore tests/test_docs.py \
    --ignore tests/test_style.py --ignore tests/test_distributed.py \
    --ignore tests/test_benchmarks.py > "$out/tests.log" 2>&1
echo "tests rc $? after $(( $(date +%s) - start )) s"
grep -E "^(FAILED|ERROR)|^\[gw[0-9]+\] .*(FAILED|ERROR)|[0-9]+ (passed|failed)" "$out/tests.log" | tail -n 30
grep -cE " PASSED " "$out/tests.log"
timeout 80 $py benchmarks/bench_small.py --rows batch,iris 2>&1 | tee "$out/small.log"
timeout 80 $py benchmarks/bench_fit.py --n 1000000 --d 32 --k 32 --covariance full \
    --peers '' --iters 3 --repeats 2 --no-x64 2>&1 | tee "$out/fit_full.log"
timeout 50 $py benchmarks/bench_fit.py --n 1000000 --d 16 --k 16 --covariance diag \
    --peers '' --no-x64 2>&1 | tee "$out/fit_diag.log"
echo "total $(( $(date +%s) - start )) s" | tee -a "$out/env.log"
