#!/usr/bin/env bash
# Creates/updates the local virtual environment .venv, installs the test tools, builds the C++
# extension in place and registers the `tcsm` command. Run by the Makefile targets; safe to run
# again: it does only what is missing, and rebuilds the extension only when csrc/ or the build
# files changed (ninja then recompiles just the changed files).
#   TCSM_BENCH=1   also install the benchmark-only packages (make bench)
#   TCSM_JOBS=N    parallel compile jobs (default: the number of cores)
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
# Packages (import name: requirement) that are missing, or not at the pinned version.
missing=$(TCSM_BENCH=${TCSM_BENCH:-0} $PY - <<'PY'
import importlib.metadata, importlib.util, os
need = {"triton": "triton", "numpy": "numpy", "pybind11": "pybind11", "ninja": "ninja",
        "setuptools": "setuptools", "packaging": "packaging", "matplotlib": "matplotlib",
        "pytest": "pytest", "pytest_benchmark": "pytest-benchmark", "hypothesis": "hypothesis",
        "mypy": "mypy", "flow_matching": "flow-matching==1.0.10"}
if os.environ["TCSM_BENCH"] == "1":
    need["cut_cross_entropy"] = "cut-cross-entropy"
def present(module, requirement):
    if importlib.util.find_spec(module) is None:
        return False
    name, _, pinned = requirement.partition("==")
    return not pinned or importlib.metadata.version(name) == pinned
print(" ".join(req for mod, req in need.items() if not present(mod, req)))
PY
)
if [ -n "$missing" ]; then
  echo "installing into .venv: $missing"
  $PY -m pip install -q $missing
fi
# Build the extension in place: progress on stdout, the full log in build/tcsm_build.log.
stamp=tcsm_kernels/.build_stamp
if ! $PY -c 'import sys, tcsm_kernels._backend as b; sys.exit(not b.cpp_available())' 2>/dev/null \
    || [ ! -f $stamp ] \
    || [ -n "$(find csrc setup.py tcsm_kernels/_build.py tcsm_kernels/_build_info.py -newer $stamp 2>/dev/null | head -1)" ]; then
  if $PY tcsm_kernels/_build.py --jobs "${TCSM_JOBS:-$(nproc)}"; then
    touch $stamp
  fi
fi
# Register the package and the `tcsm` command (editable). TCSM_NO_EXTENSION=1: pip installs the
# Python package only, so it does not compile the extension a second time (it would, in a
# throwaway build directory); the in-place build above is what gets imported.
if [ ! -x .venv/bin/tcsm ]; then
  mkdir -p build
  TCSM_NO_EXTENSION=1 $PY -m pip install --no-build-isolation --no-deps -e . \
    >build/tcsm_register.log 2>&1 \
    || echo "note: could not register the tcsm command (build/tcsm_register.log); use python -m tcsm_kernels"
fi
