"""Which backend runs an op: the C++ extension (CPU), Triton (CUDA, or CPU under
TRITON_INTERPRET=1) or the reference. ``auto`` picks the fused kernel for the tensor's device
and falls back to the reference, with one warning, when that kernel is unavailable."""
from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import torch

from . import _build_info

_PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE_DIR.parent  # the source checkout, when the package runs from one


def _how_to_build() -> str:
    """How to build the extension, for the way this package was installed."""
    jit = ("" if os.environ.get("TCSM_JIT") == "1" else
           "; or set TCSM_JIT=1 to compile it on first import (cached in ~/.cache/tcsm_kernels)")
    if (_CHECKOUT / "setup.py").is_file() and (_CHECKOUT / "csrc").is_dir():
        return (f"Build it in the source checkout {_CHECKOUT}: `make test` or `bash scripts/env.sh` "
                "(the checkout's .venv; log in build/tcsm_build.log), or with this Python "
                f"`python setup.py build_ext --inplace`{jit}.")
    return ("Reinstall tcsm_kernels from its source directory with "
            "`pip install --no-build-isolation .` in this environment (compiles against the torch "
            f"installed here; needs a C++ compiler, setuptools and ninja){jit}.")


def _prebuilt() -> str | None:
    """Imports the prebuilt tcsm_kernels._C (which registers the ``tcsm::*_cpu`` ops); returns
    None when it loaded, else what is wrong with it."""
    spec = importlib.util.find_spec(f"{__package__}._C")
    if spec is None or spec.origin is None:
        return f"the C++ extension tcsm_kernels._C is not built (no _C*.so in {_PACKAGE_DIR})"
    # compare before importing: a library built against another torch may crash on load
    built_for = _build_info.torch_version_of(spec.origin)
    if built_for is not None and built_for != torch.__version__:
        return (f"the C++ extension {spec.origin} was compiled against torch {built_for}, but "
                f"torch {torch.__version__} is running")
    try:
        from . import _C  # noqa: F401  (import registers the ops)
    except ImportError as err:
        return f"the C++ extension {spec.origin} could not be loaded ({err})"
    return None


def _load_cpp() -> str | None:
    """Loads the C++ ops: the prebuilt extension, else (TCSM_JIT=1) one compiled now. Returns
    None when loaded, else what is missing and how to build it (and warns with that, once)."""
    problem = _prebuilt()
    if problem is None:
        return None
    if os.environ.get("TCSM_JIT") == "1":
        from . import _jit
        try:
            _jit.load()
            return None
        except RuntimeError as err:
            problem = f"{problem}; {err}"
    problem = f"{problem}. {_how_to_build()}"
    warnings.warn(f"tcsm_kernels: {problem} Until then CPU ops fall back to the slow reference "
                  "implementation.", RuntimeWarning, stacklevel=2)
    return problem


# Decided once at import (plain module constants, which torch.compile traces through).
_CPP_PROBLEM = _load_cpp()
_CPP_AVAILABLE = _CPP_PROBLEM is None
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
_WARNED_DEVICES: set[str] = set()


def cpp_available() -> bool:
    return _CPP_AVAILABLE


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that will run: 'cpp', 'triton' or 'reference'."""
    if backend == "reference":
        return "reference"
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs CPU tensors only, got a {device.type} tensor")
        if dtype == torch.float64:
            raise TypeError("backend='cpp' takes float32/bfloat16/float16 logits; float64 runs "
                            "on backend='reference'")
        if not cpp_available():
            raise RuntimeError(f"backend='cpp' requested, but {_CPP_PROBLEM}")
        return "cpp"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' requested but triton is not installed")
        if device.type == "cpu" and not triton_interpreting():
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set "
                             "before triton is imported")
        if dtype == torch.float64:
            raise TypeError("backend='triton' takes float32/bfloat16/float16 logits")
        return "triton"
    if dtype == torch.float64:  # auto: the fused kernels compute in float32
        return "reference"
    if device.type == "cpu":
        return "cpp" if cpp_available() else "reference"
    if device.type == "cuda" and triton_available():
        return "triton"
    _warn_no_kernel(device.type)
    return "reference"


def _warn_no_kernel(device_type: str) -> None:
    if device_type in _WARNED_DEVICES:
        return
    _WARNED_DEVICES.add(device_type)
    warnings.warn(f"tcsm_kernels: no fused kernel for {device_type} tensors here; using the "
                  "reference implementation", RuntimeWarning, stacklevel=4)
