"""The output type of the CTMC step (``ops.ctmc_step`` and its oracle ``reference.ctmc_step``).

A module of its own because both produce it and the op falls back to the oracle: kept in
ops/ctmc_step.py, reference -> ops.ctmc_step -> reference would be an import cycle.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch


class StepOutput(NamedTuple):
    """Result of one CTMC step; fields not asked for are None. All (...) shaped."""

    x: torch.Tensor
    x1: Optional[torch.Tensor] = None
    prob: Optional[torch.Tensor] = None
    margin: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None


def step_result(x_next: torch.Tensor, x1: torch.Tensor, prob: torch.Tensor, margin: torch.Tensor,
                entropy: torch.Tensor, batch_shape: Tuple[int, ...], return_x1: bool,
                return_confidence: bool):
    """The flat (N,) outputs of a step shaped as ``ctmc_step`` promises: x_next (...) alone, or a
    ``StepOutput`` holding x1 and/or the confidence outputs that were asked for."""
    if not (return_x1 or return_confidence):
        return x_next.reshape(batch_shape)
    conf = [None, None, None]
    if return_confidence:
        conf = [t.reshape(batch_shape) for t in (prob, margin, entropy)]
    return StepOutput(x_next.reshape(batch_shape), x1.reshape(batch_shape) if return_x1 else None,
                      *conf)
