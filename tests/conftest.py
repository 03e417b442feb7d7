"""Test harness. Triton kernels run compiled on CUDA when a GPU is present, otherwise through
the Triton interpreter on CPU: TRITON_INTERPRET must be set before triton is first imported,
which is why it happens here, at collection time, before any test module loads."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tcsm_kernels import _backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="session")
def triton_device() -> str:
    """Device whose tensors the Triton backend runs on in this session."""
    if not _backend.triton_available():
        pytest.skip("triton is not installed")
    return "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def backends_for(device: str = "cpu"):
    """Fused backends that can run here besides the reference."""
    names = []
    if device == "cpu" and _backend.cpp_available():
        names.append("cpp")
    if _backend.triton_available() and (HAS_CUDA or _backend.triton_interpreting()):
        names.append("triton")
    return names
