#!/usr/bin/env bash
# Set up a fresh virtual environment and run the main job on the embedded default data:
# semantic IDs for MovieLens-100K (item texts -> all-MiniLM-L6-v2 embeddings -> residual
# quantization), with statistics, backend timings and sample buckets. Extra arguments go to
# `sigma-fast rq-demo` (see `sigma-fast rq-demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh model
sigma-fast rq-demo "$@"
