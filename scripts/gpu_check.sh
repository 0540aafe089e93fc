#!/usr/bin/env bash
# One command for every GPU check on a machine with a CUDA device and the toolchain already
# installed (torch, triton, pybind11, scikit-build-core, cmake, ninja, nvcc): build with the CUDA
# extension, run the whole test suite (CUDA and Triton tests run on the device), then the GPU
# benchmarks. Results: $OUT (default ./gpu-results) gets the logs and the benchmark JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
nvidia-smi | tee "$out/nvidia-smi.txt" || true
SIGMA_FAST_CUDA=ON python -m pip install --no-build-isolation --no-deps -q . 2>&1 | tail -20
cd /tmp  # import the installed package, not the source tree
python -c "import sigma_fast, json; print({k: (v.available, v.reason) for k, v in sigma_fast.backends().items()})" | tee "$OLDPWD/$out/backends.txt"
cd "$OLDPWD"
status=0
python -m pytest -q -p no:cacheprovider tests -rs 2>&1 | tee "$out/tests.txt" || status=$?
SIGMA_FAST_BENCH_JSON="$out/bench.json" python -m pytest -q -p no:cacheprovider bench/ \
  --benchmark-only -k "gpu" 2>&1 | tee "$out/bench.txt" || status=$?
exit $status
