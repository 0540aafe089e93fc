#!/usr/bin/env bash
# One command for every GPU check on a machine with a CUDA device and the toolchain already
# installed (torch, triton, pybind11, scikit-build-core, cmake, ninja, nvcc; pytest, hypothesis,
# pytest-benchmark, and pytest-xdist / pytest-timeout when present):
#   1. build and install with the CUDA extension (SIGMA_FAST_CUDA_ARCHITECTURES, default 80;90)
#   2. the tests that run on the device (cuda and triton backends, GPU-only tests)
#   3. the GPU benchmarks (bench/*: the *_gpu benchmarks, eager and CUDA-graph step timings)
#   4. the rest of the test suite (with the device visible, in parallel when xdist is there)
# Each phase has its own time limit (GPU_CHECK_LIMITS="tests bench rest" in seconds), so a slow
# phase cannot starve the next. Logs and the benchmark JSON go to $OUT (default ./gpu-results).
# GPU_CHECK_ONLY=serving restricts phases 2-3 to the serving engine (tests/serving, the serving
# benchmarks on a synthetic catalogue and a random SmolLM2-135M-shaped model: no dataset or
# model files needed) and skips phase 4.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
out=$(cd "$out" && pwd)
read -r lim_tests lim_bench lim_rest <<<"${GPU_CHECK_LIMITS:-180 150 90}"
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
  | tee "$out/gpu.txt" || true
python -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch', \
torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', \
transformers.__version__)" | tee -a "$out/gpu.txt"

start=$SECONDS
SIGMA_FAST_CUDA=ON python -m pip install --no-build-isolation --no-deps -q \
  -C "cmake.define.SIGMA_FAST_CUDA_ARCHITECTURES=${SIGMA_FAST_CUDA_ARCHITECTURES:-80;90}" . \
  >"$out/build.txt" 2>&1
rc=$?
tail -5 "$out/build.txt"
echo "build: rc=$rc in $((SECONDS - start)) s"
[ $rc -eq 0 ] || exit $rc

# Import the installed package, not the source tree.
(cd /tmp && python -c "import sigma_fast; print({k: (v.available, v.reason) for k, v in \
sigma_fast.backends().items()}); print(sigma_fast.build_info())") | tee -a "$out/gpu.txt"

plugins=()
python -c "import xdist" 2>/dev/null && plugins+=(-n 8)
python -c "import pytest_timeout" 2>/dev/null && plugins+=(--timeout 120)
device_tests="cuda or triton or gpu or device"
test_paths=(tests)
bench_paths=(bench/)
if [ "${GPU_CHECK_ONLY:-}" = serving ]; then
  test_paths=(tests/serving)
  bench_paths=(bench/bench_serving.py)
fi
status=0

start=$SECONDS
timeout "$lim_tests" python -m pytest -q -p no:cacheprovider "${test_paths[@]}" -rs -k "$device_tests" \
  "${plugins[@]}" 2>&1 | tee "$out/tests_device.txt" | tail -40
rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || status=1
echo "device tests: rc=$rc in $((SECONDS - start)) s"

start=$SECONDS
SIGMA_FAST_BENCH_N=${SIGMA_FAST_BENCH_N:-1000000} SIGMA_FAST_BENCH_JSON="$out/bench.json" \
  timeout "$lim_bench" python -m pytest -q -p no:cacheprovider "${bench_paths[@]}" --benchmark-only -k gpu \
  --benchmark-columns=min,median,rounds 2>&1 | tee "$out/bench.txt" \
  | sed -n '/benchmark summary/,$p'
rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || status=1
echo "benchmarks: rc=$rc in $((SECONDS - start)) s"

[ "${GPU_CHECK_ONLY:-}" = serving ] && exit $status
start=$SECONDS
timeout "$lim_rest" python -m pytest -q -p no:cacheprovider tests -rs -k "not ($device_tests)" \
  "${plugins[@]}" 2>&1 | tee "$out/tests_rest.txt" | tail -25
rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || status=1
echo "other tests: rc=$rc in $((SECONDS - start)) s"
exit $status
