"""Drop-in for kuleshov-group/mdlm's SUBS loss term.

MDLM's SUBS parameterisation gives the mask column probability 0 and copies unmasked tokens, so
its per-token NELBO term is -log p(x0) (softmax without the mask column) on masked positions,
times the time weight (dsigma / expm1(sigma), i.e. 1 / t' for the log-linear schedule), and 0
elsewhere.
"""
from __future__ import annotations

import torch

from .. import _checks


def _fused_loss():
    from ..ops.loss import fused_tcsm_loss  # imported on use: the op module loads its backends
    return fused_tcsm_loss


def subs_loss(logits: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, mask_id: int,
              weight) -> torch.Tensor:
    """Per-token SUBS loss (B, L) float32: weight * -log p(x0) where xt == mask_id, else 0.

    logits (B, L, V), x0 clean ids and xt noisy ids (B, L). ``weight``: a number, a (B,) vector
    (one weight per sequence, as MDLM's ``dsigma / expm1(sigma)``) or a tensor broadcastable to
    (B, L). One fused call: divergence "kl", ``mask_id`` excluded from the softmax,
    weight * [xt == mask_id], reduction "none".
    """
    _checks.tensor("xt", xt, _checks.INDEX_DTYPES)
    if xt.shape != x0.shape:
        raise ValueError(f"xt must have the shape of x0 {tuple(x0.shape)}, got {tuple(xt.shape)}")
    weight = torch.as_tensor(weight, dtype=torch.float32, device=xt.device)
    if weight.dim() == 1 and xt.dim() > 1 and weight.shape[0] == xt.shape[0]:
        weight = weight.reshape((-1,) + (1,) * (xt.dim() - 1))
    weight = torch.where(xt == mask_id, weight, 0)
    return _fused_loss()(logits, x0, divergence="kl", mask_id=mask_id, weight=weight,
                         reduction="none")
