"""Forward noising x_1 -> x_t (docs/math.md 1), factorised over positions.

p(x_t^i | x_1^i) = kappa_t delta(x_1^i) + (1 - kappa_t) p0, with p0 = delta(mask_id) for the
masked process and uniform over the vocabulary for the uniform process. ``t`` has one entry per
sequence, shape (B,), broadcast over the trailing (L,) positions of x_1 (B, L).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import _checks
from .schedules import Schedule


@dataclass(frozen=True)
class MaskedProcess:
    """Absorbing process: a token is replaced by ``mask_id`` with probability 1 - kappa_t."""

    schedule: Schedule
    vocab_size: int
    mask_id: int

    def __post_init__(self):
        _checks.column_id("mask_id", self.mask_id, self.vocab_size)

    def sample(self, x1: torch.Tensor, t, generator: Optional[torch.Generator] = None):
        """x_t with the shape of x1 (B, ...)."""
        t = _checks.process_inputs("x1", x1, t, self.vocab_size)
        noise = torch.rand(x1.shape, generator=generator, device=x1.device) >= self.schedule.kappa(t)
        return torch.where(noise, torch.full_like(x1, self.mask_id), x1)

    def loss_weight(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """Per-position ELBO weight w(t) [x_t == mask_id] (math.md 1), float32 like x_t."""
        t = _checks.process_inputs("x_t", x_t, t, self.vocab_size)
        return (self.schedule.time_weight(t) * (x_t == self.mask_id)).float()


@dataclass(frozen=True)
class UniformProcess:
    """Uniform process: a token is resampled uniformly over the vocabulary w.p. 1 - kappa_t."""

    schedule: Schedule
    vocab_size: int

    def sample(self, x1: torch.Tensor, t, generator: Optional[torch.Generator] = None):
        """x_t with the shape of x1 (B, ...)."""
        t = _checks.process_inputs("x1", x1, t, self.vocab_size)
        noise = torch.rand(x1.shape, generator=generator, device=x1.device) >= self.schedule.kappa(t)
        fresh = torch.randint(0, self.vocab_size, x1.shape, generator=generator, device=x1.device,
                              dtype=x1.dtype)
        return torch.where(noise, fresh, x1)

    def loss_weight(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """Every position carries loss with weight w(t)."""
        t = _checks.process_inputs("x_t", x_t, t, self.vocab_size)
        return self.schedule.time_weight(t).expand(x_t.shape).float()
