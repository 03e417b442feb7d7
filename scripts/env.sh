#!/usr/bin/env bash
# Creates/updates the local virtual environment .venv and builds the C++ extension.
# Sourced by the Makefile targets; safe to run again (does only what is missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # system site packages: a torch >= 2.4 that is already installed (e.g. a CUDA build) is reused
  "$PYTHON" -m venv --system-site-packages .venv
fi
PY=.venv/bin/python
if ! $PY -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 4))' 2>/dev/null; then
  $PY -m pip install -q "torch==2.13.0"
fi
missing=$($PY - <<'PY'
import importlib.util
mods = {"triton": "triton", "numpy": "numpy", "pybind11": "pybind11", "ninja": "ninja",
        "pytest": "pytest", "pytest_benchmark": "pytest-benchmark", "hypothesis": "hypothesis",
        "matplotlib": "matplotlib", "setuptools": "setuptools"}
print(" ".join(pkg for mod, pkg in mods.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
  $PY -m pip install -q $missing
fi
# Build the extension in place (ninja; incremental) and register the `tcsm` console script.
if ! $PY -c 'import tcsm_kernels._C' 2>/dev/null || [ -n "$(find csrc -newer tcsm_kernels/.build_stamp 2>/dev/null | head -1)" ] || [ ! -f tcsm_kernels/.build_stamp ]; then
  PATH="$PWD/.venv/bin:$PATH" $PY setup.py -q build_ext --inplace -j 2 >/tmp/tcsm_build_$$.log 2>&1 \
    || { tail -40 /tmp/tcsm_build_$$.log; echo "C++ build failed (the package falls back to the reference)"; }
  touch tcsm_kernels/.build_stamp
fi
if [ ! -x .venv/bin/tcsm ]; then
  $PY -m pip install -q --no-build-isolation --no-deps -e . >/dev/null 2>&1 || \
    echo "note: could not register the tcsm console script; use python -m tcsm_kernels"
fi
