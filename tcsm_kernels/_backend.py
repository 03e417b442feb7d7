"""Which backend runs an op: the C++ extension (CPU), Triton (CUDA, or CPU under
TRITON_INTERPRET=1) or the reference. ``auto`` picks the fused kernel for the tensor's device
and falls back to the reference, with one warning, when that kernel is unavailable."""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch


def _load_cpp() -> bool:
    """Load the compiled extension (registers the ``tcsm::*_cpu`` ops); warn once if missing."""
    try:
        from . import _C  # noqa: F401  (import registers the ops)
    except ImportError as err:
        warnings.warn(f"tcsm_kernels: the C++ extension could not be loaded ({err}); CPU ops "
                      "fall back to the slow reference implementation. Build it with "
                      "`bash scripts/env.sh`.", RuntimeWarning, stacklevel=2)
        return False
    return True


# Decided once at import (plain module constants, which torch.compile traces through).
_CPP_AVAILABLE = _load_cpp()
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
_WARNED_DEVICES = set()


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
            raise RuntimeError("backend='cpp' requested but the C++ extension is not built")
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
