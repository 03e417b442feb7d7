"""Implementations compared by the fused-linear benchmark: hidden (N, D), head (V, D) -> loss.

fused-linear   tcsm_kernels.fused_linear_tcsm_loss (defaults: chunk_rows="auto")
unfused        F.linear, then tcsm_kernels.fused_tcsm_loss on the (N, V) logits
eager          F.linear, then F.cross_entropy (kl) or the eager reference (gkl)
cce            Cut Cross-Entropy's linear_cross_entropy(impl="torch_compile") (kl only)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IMPLS = {"kl": ["fused-linear", "unfused", "eager", "cce"], "gkl": ["fused-linear", "unfused",
                                                                    "eager"]}


def linear_case(rows: int, dim: int, vocab: int, device: str = "cpu", seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g, device=device)
    head = torch.randn(vocab, dim, generator=g, device=device) / dim ** 0.5
    target = torch.randint(0, vocab, (rows,), generator=g, device=device)
    return hidden, head, target


def linear_impl(name: str, divergence: str):
    """(hidden, head, target) -> scalar loss."""
    import tcsm_kernels
    from tcsm_kernels import reference

    if name == "fused-linear":
        return lambda h, w, t: tcsm_kernels.fused_linear_tcsm_loss(h, w, t, divergence=divergence)
    if name == "unfused":
        return lambda h, w, t: tcsm_kernels.fused_tcsm_loss(F.linear(h, w), t,
                                                            divergence=divergence)
    if name == "eager":
        if divergence == "kl":
            return lambda h, w, t: F.cross_entropy(F.linear(h, w), t)
        return lambda h, w, t: reference.tcsm_loss(F.linear(h, w), t, divergence=divergence)
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy
        return lambda h, w, t: linear_cross_entropy(h, w, t, impl="torch_compile")
    raise ValueError(f"unknown implementation {name!r}")


def three_matmuls(hidden, head, grad_logits):
    """The floor of the op: logits = h W^T, grad_h = g W, grad_W = g^T h."""
    logits = hidden @ head.T
    grad_hidden = grad_logits @ head
    grad_head = grad_logits.T @ hidden
    return logits, grad_hidden, grad_head
