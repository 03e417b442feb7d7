"""Drop-in for kuleshov-group/mdlm's SUBS loss term and its log-linear time weight.

MDLM's SUBS parameterisation gives the mask column probability 0 and copies unmasked tokens, so
its per-token NELBO term is -log p(x0) (softmax without the mask column) on masked positions,
times the time weight dsigma / expm1(sigma) (``loglinear_weight`` for the log-linear noise),
and 0 elsewhere. Time runs as in MDLM: t = 1 is noise (this library's 1 - t).
"""
from __future__ import annotations

import torch

from .. import _checks
from ..ops.loss import fused_tcsm_loss
from ..schedules import LogLinearSchedule
from . import _args


def loglinear_weight(t, eps: float = 1e-3) -> torch.Tensor:
    """MDLM's NELBO weight dsigma / expm1(sigma) of its log-linear noise at MDLM times t in
    (0, 1] (a number or a tensor, e.g. (B,)); float32, or float64 for float64 t.

    ``LogLinearSchedule(eps).mdlm_time_weight(t)``, the closed form 1 / t of MDLM's log1p/expm1
    expression: correctly rounded as t -> 0 (~1e7 at t = 1e-7), where ``time_weight(1 - t)``
    would have rounded its argument first (relative error 2.4e-3 at t = 1e-5).
    """
    schedule = LogLinearSchedule(_args.real("eps", eps))
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(_args.real("t", t))
    _checks.tensor("t", t, _checks.FLOAT_DTYPES)
    t = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
    if _checks.resolve_check(None, t.device) and bool(((t <= 0) | (t > 1) | t.isnan()).any()):
        raise ValueError("t must lie in (0, 1] (MDLM time, 1 = noise)")
    return schedule.mdlm_time_weight(t)


def subs_loss(logits: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, mask_id: int,
              weight) -> torch.Tensor:
    """Per-token SUBS loss (B, L) float32: weight * -log p(x0) where xt == mask_id, else 0.

    logits (B, L, V), x0 clean ids and xt noisy ids (B, L). ``weight``: a number, a (B,) vector
    (one weight per sequence, as MDLM's ``dsigma / expm1(sigma)``, see ``loglinear_weight``) or a
    tensor broadcastable to (B, L). One fused call: divergence "kl", ``mask_id`` excluded from
    the softmax, weight * [xt == mask_id], reduction "none".
    """
    vocab, batch_shape = _checks.rows_and_ids("logits", logits, "x0", x0)
    _checks.tensor("xt", xt, _checks.INDEX_DTYPES)
    if xt.shape != x0.shape:
        raise ValueError(f"xt must have the shape of x0 {batch_shape}, got {tuple(xt.shape)}")
    mask_id = _args.integer("mask_id", mask_id, 0)
    _checks.column_id("mask_id", mask_id, vocab)
    if isinstance(weight, torch.Tensor):
        _checks.tensor("weight", weight, _checks.FLOAT_DTYPES)
    else:
        weight = _args.real("weight", weight)
    weight = torch.as_tensor(weight, dtype=torch.float32, device=xt.device)
    if weight.dim() == 1 and xt.dim() > 1 and weight.shape[0] == xt.shape[0]:
        weight = weight.reshape((-1,) + (1,) * (xt.dim() - 1))
    weight = torch.where(xt == mask_id, _checks.broadcast("weight", weight, batch_shape), 0)
    return fused_tcsm_loss(logits, x0, divergence="kl", mask_id=mask_id, weight=weight,
                           reduction="none")
