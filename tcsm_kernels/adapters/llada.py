"""Drop-ins for ML-GSAI/LLaDA's sampling helpers (generate.py) and training loss.

LLaDA's masked positions carry no time input; its vocabulary includes the mask token, which
LLaDA does not exclude from sampling or the loss, and neither do these functions.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import _checks
from ..sampling import top_per_row

REMASKINGS = ("low_confidence", "random")


def _fused_loss():
    from ..ops.loss import fused_tcsm_loss  # imported on use: the op module loads its backends
    return fused_tcsm_loss


def _step_op():
    from ..ops.ctmc_step import ctmc_step
    return ctmc_step


def _check_mask_index(mask_index) -> torch.Tensor:
    _checks.tensor("mask_index", mask_index, (torch.bool,))
    if mask_index.dim() != 2:
        raise ValueError(f"mask_index must have shape (B, L), got {tuple(mask_index.shape)}")
    return mask_index


def get_num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) int64: masked count per row split over ``steps``, the remainder going to the
    first steps (LLaDA's linear schedule). mask_index (B, L) bool."""
    mask_index = _check_mask_index(mask_index)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    masked = mask_index.sum(dim=1, keepdim=True)
    first_steps = torch.arange(steps, device=mask_index.device) < masked % steps
    return masked // steps + first_steps.long()


def get_transfer_index(logits: torch.Tensor, temperature: float, remasking: str,
                       mask_index: torch.Tensor, x: torch.Tensor,
                       num_transfer_tokens: Union[torch.Tensor, int, None],
                       threshold: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """LLaDA's per-step proposal and selection. logits (B, L, V), mask_index and x (B, L).

    x0: the greedy argmax for ``temperature`` 0, else a draw from softmax(logits / T) by the fused
    step op (Philox seed drawn from torch's global generator, so ``torch.manual_seed`` makes it
    reproducible); non-masked positions keep x. Confidence: p(x0) under softmax(logits)
    ("low_confidence") or torch.rand ("random"). transfer_index (B, L) bool: per row the
    ``num_transfer_tokens[b]`` most confident masked positions; with ``threshold``, every masked
    position whose confidence is >= threshold, and at least the most confident one. Unlike
    LLaDA's topk, transfer_index never marks an unmasked position (there x0 == x, so applying it
    gives the same x). Returns (x0 (B, L) int64, transfer_index).
    """
    _checks.tensor("logits", logits, _checks.FLOAT_DTYPES)
    mask_index = _check_mask_index(mask_index)
    _checks.tensor("x", x, _checks.INDEX_DTYPES)
    if logits.dim() != 3 or logits.shape[:2] != x.shape or x.shape != mask_index.shape:
        raise ValueError(f"logits (B, L, V), x and mask_index (B, L) disagree: "
                         f"{tuple(logits.shape)}, {tuple(x.shape)}, {tuple(mask_index.shape)}")
    _checks.choice("remasking", remasking, REMASKINGS)
    if isinstance(temperature, torch.Tensor) or not float(temperature) >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    temperature = float(temperature)
    batch = x.shape[0]

    if temperature == 0:
        x0 = logits.argmax(dim=-1)
    else:
        out = _step_op()(logits, x, torch.zeros((), device=x.device), temperature=temperature,
                         seed=int(torch.randint(0, 2**62, (1,))), return_x1=True,
                         return_confidence=remasking == "low_confidence" and temperature == 1.0)
        x0 = out.x1
    if remasking == "low_confidence":
        if temperature == 1.0:
            confidence = out.prob
        else:
            z = logits.float()
            confidence = torch.exp(z.gather(-1, x0[..., None])[..., 0] - torch.logsumexp(z, -1))
    else:
        confidence = torch.rand(x0.shape, device=x0.device)
    x0 = torch.where(mask_index, x0, x.long())

    if threshold is not None:
        most_confident = top_per_row(confidence, mask_index,
                                     torch.ones(batch, dtype=torch.int64, device=x.device))
        return x0, mask_index & ((confidence >= threshold) | most_confident)
    if num_transfer_tokens is None:
        raise ValueError("num_transfer_tokens is required when threshold is None")
    count = torch.as_tensor(num_transfer_tokens, device=x.device).reshape(-1).expand(batch)
    return x0, top_per_row(confidence, mask_index, count)


def masked_ce(logits: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor,
              p_mask: torch.Tensor) -> torch.Tensor:
    """LLaDA's pre-training loss: sum over masked positions of CE(logits, ids) / p_mask, divided
    by B * L. logits (B, L, V), ids (B, L), masked (B, L) bool, p_mask broadcastable to (B, L).
    One fused call: divergence "kl", weight = [masked] / p_mask, normalizer B * L."""
    _checks.tensor("masked", masked, (torch.bool,))
    _checks.tensor("p_mask", p_mask, _checks.FLOAT_DTYPES)
    if masked.shape != ids.shape:
        raise ValueError(f"masked must have the shape of ids {tuple(ids.shape)}, got "
                         f"{tuple(masked.shape)}")
    weight = torch.where(masked, 1 / p_mask.float(), 0)
    return _fused_loss()(logits, ids, divergence="kl", weight=weight, reduction="mean",
                         normalizer=float(ids.numel()))
