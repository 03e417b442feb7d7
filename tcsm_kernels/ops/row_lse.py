"""Row log-sum-exp (N, V) -> (N,): the smallest op through the whole C++ path (build, load,
``tcsm::`` registration, fake kernel for torch.compile)."""
from __future__ import annotations

import torch

from .. import _backend, _checks

if _backend.cpp_available():
    @torch.library.register_fake("tcsm::row_lse_cpu")
    def _row_lse_fake(x):
        return x.new_empty(x.shape[:1])


def row_logsumexp(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """log sum_v exp(x[n, v]) for x (N, V) float32; (N,) float32."""
    _checks.tensor("x", x, (torch.float32,))
    if x.dim() != 2:
        raise ValueError(f"x must be (N, V), got shape {tuple(x.shape)}")
    _checks.choice("backend", backend, ("auto", "reference", "cpp"))
    chosen = _backend.resolve(backend, x.device, x.dtype)
    if chosen == "cpp":
        return torch.ops.tcsm.row_lse_cpu(x)
    return torch.logsumexp(x, dim=1)
