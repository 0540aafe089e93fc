#!/usr/bin/env bash
# Development helper: build the C++ core into a private build directory and run pytest against
# a private copy of the package, so several people can build and test one checkout at once.
#   scripts/dev_overlay.sh NAME [pytest args...]
# Build dir: build/dev-NAME; package copy: /tmp/sigma_fast-overlay-NAME.
set -euo pipefail
name=$1; shift
root=$(cd "$(dirname "$0")/.." && pwd)
build=$root/build/dev-$name
overlay=/tmp/sigma_fast-overlay-$name
if [ ! -f "$build/build.ninja" ]; then
  cmake -S "$root" -B "$build" -G Ninja -DSIGMA_FAST_CUDA=OFF \
    -Dpybind11_DIR="$(python -c 'import pybind11; print(pybind11.get_cmake_dir())')" >/dev/null
fi
cmake --build "$build" -j2
mkdir -p "$overlay"
rsync -a --delete --exclude '*.so' --exclude '__pycache__' --exclude '_build_info.json' \
  "$root/python/sigma_fast/" "$overlay/sigma_fast/"
cp "$build"/_core*.so "$build/_build_info.json" "$overlay/sigma_fast/"
cd "$root"
PYTHONPATH=$overlay python -m pytest "$@"
