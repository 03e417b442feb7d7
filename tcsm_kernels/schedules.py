"""kappa(t) schedules (docs/math.md 1): t = 1 is clean data, t = 0 is noise.

kappa(t) is the probability that a token is still clean at time t. Each schedule gives
kappa and its derivative as tensors; the helpers below derive the ELBO time weight and the
CTMC jump probabilities from them. MDLM, SEDD and LLaDA run time the other way (t' = 1 - t):
convert with ``from_mdlm_time`` / ``to_mdlm_time``.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


def _as_tensor(t) -> torch.Tensor:
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


class Schedule(ABC):
    """Base class: subclasses define ``kappa(t)`` and ``dkappa(t)`` elementwise."""

    @abstractmethod
    def kappa(self, t) -> torch.Tensor:
        """Probability that a token is clean at time t."""

    @abstractmethod
    def dkappa(self, t) -> torch.Tensor:
        """d kappa / dt."""

    def time_weight(self, t) -> torch.Tensor:
        """ELBO weight of a loss-carrying position, ``dkappa_t / (1 - kappa_t)``; needs t < 1."""
        t = _as_tensor(t)
        return self.dkappa(t) / (1 - self.kappa(t))

    def mdlm_time_weight(self, t_prime) -> torch.Tensor:
        """``time_weight`` at MDLM time t' = 1 - t (1 = noise, as in MDLM, SEDD and LLaDA). This
        default rounds 1 - t' first, which costs relative precision as t' -> 0; a schedule with
        a closed form in t' overrides it."""
        return self.time_weight(from_mdlm_time(t_prime))

    def jump_prob_exact(self, t, s) -> torch.Tensor:
        """Masked-path probability of unmasking between t and s > t: (k_s - k_t) / (1 - k_t)."""
        t, s = _as_tensor(t), _as_tensor(s)
        k_t = self.kappa(t)
        return ((self.kappa(s) - k_t) / (1 - k_t)).clamp(0, 1)

    def jump_prob_euler(self, t, s) -> torch.Tensor:
        """Euler jump probability ``1 - exp(-(s - t) dkappa_t / (1 - kappa_t))``."""
        t, s = _as_tensor(t), _as_tensor(s)
        return -torch.expm1(-(s - t) * self.time_weight(t))


@dataclass(frozen=True)
class LinearSchedule(Schedule):
    """kappa = t."""

    def kappa(self, t):
        return _as_tensor(t).clone()

    def dkappa(self, t):
        return torch.ones_like(_as_tensor(t))


@dataclass(frozen=True)
class CosineSchedule(Schedule):
    """kappa = 1 - cos(pi t / 2)."""

    def kappa(self, t):
        return 1 - torch.cos(math.pi / 2 * _as_tensor(t))

    def dkappa(self, t):
        return math.pi / 2 * torch.sin(math.pi / 2 * _as_tensor(t))


@dataclass(frozen=True)
class PolynomialSchedule(Schedule):
    """kappa = t ** exponent."""

    exponent: float = 2.0

    def __post_init__(self):
        if not (math.isfinite(self.exponent) and self.exponent > 0):
            raise ValueError(f"exponent must be finite and > 0, got {self.exponent}")

    def kappa(self, t):
        return _as_tensor(t) ** self.exponent

    def dkappa(self, t):
        t = _as_tensor(t)
        return self.exponent * t ** (self.exponent - 1)


@dataclass(frozen=True)
class LogLinearSchedule(Schedule):
    """MDLM's log-linear noise: sigma(t') = -log(1 - (1 - eps) t'), kappa(t) = exp(-sigma(1 - t)).

    That is kappa = eps + (1 - eps) t, so the time weight is 1 / (1 - t), MDLM's 1 / t'; near
    t' = 0 evaluate it at MDLM time, ``mdlm_time_weight(t')``, not ``time_weight(1 - t')``, whose
    argument has already lost t''s low digits in float32 (relative error 2e-3 at t' = 1e-5).
    """

    eps: float = 1e-3

    def __post_init__(self):
        if not 0 <= self.eps < 1:
            raise ValueError(f"eps must be in [0, 1), got {self.eps}")

    def kappa(self, t):
        return self.eps + (1 - self.eps) * _as_tensor(t)

    def dkappa(self, t):
        return torch.full_like(_as_tensor(t), 1 - self.eps)

    def time_weight(self, t) -> torch.Tensor:
        """1 / (1 - t) as ``mdlm_time_weight(1 - t)``: 1 - t is exact for t >= 1/2, so unlike
        the generic dkappa / (1 - kappa), which cancels in 1 - kappa, this keeps float32
        precision near t = 1."""
        return self.mdlm_time_weight(1 - _as_tensor(t))

    def mdlm_time_weight(self, t_prime) -> torch.Tensor:
        """MDLM's dsigma / expm1(sigma) at MDLM time t', which is exactly 1 / t' for every eps
        (expm1(sigma) = (1 - eps) t' / (1 - (1 - eps) t') = dsigma t'): correctly rounded down
        to t' -> 0, and finite at t' = 1 for eps = 0, where MDLM's form is inf / inf."""
        return 1 / _as_tensor(t_prime)


SCHEDULES = {"linear": LinearSchedule, "cosine": CosineSchedule,
             "polynomial": PolynomialSchedule, "loglinear": LogLinearSchedule}


def get_schedule(name: str, **options) -> Schedule:
    """Schedule by name: linear, cosine, polynomial (exponent=...), loglinear (eps=...)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {tuple(SCHEDULES)}, got {name!r}")
    return SCHEDULES[name](**options)


def from_mdlm_time(t_prime) -> torch.Tensor:
    """MDLM/SEDD/LLaDA time (1 = noise) to this library's time (1 = clean)."""
    return 1 - _as_tensor(t_prime)


to_mdlm_time = from_mdlm_time  # the map t -> 1 - t is its own inverse
