"""Drop-ins for facebookresearch/flow_matching's discrete loss and Euler solver.

``path`` is duck-typed as in flow_matching: anything with ``path.scheduler(t)`` returning an
object with ``alpha_t`` and ``d_alpha_t`` (their ``MixtureDiscreteProbPath``). ``MixturePath``
wraps one of this library's schedules the same way, so flow_matching need not be installed.
Time runs as in flow_matching and this library: t = 1 is data, alpha_t = kappa_t.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from .. import _checks
from ..sampling import progress_steps
from ..schedules import Schedule


def _fused_loss():
    from ..ops.loss import fused_tcsm_loss  # imported on use: the op module loads its backends
    return fused_tcsm_loss


def _step_op():
    from ..ops.ctmc_step import ctmc_step
    return ctmc_step


class SchedulerOutput(NamedTuple):
    """kappa_t and its derivative under flow_matching's names."""

    alpha_t: torch.Tensor
    sigma_t: torch.Tensor
    d_alpha_t: torch.Tensor
    d_sigma_t: torch.Tensor


class MixturePath:
    """A flow_matching-style mixture path over one of this library's schedules."""

    def __init__(self, schedule: Schedule):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
        self.schedule = schedule

    def scheduler(self, t: torch.Tensor) -> SchedulerOutput:
        kappa = self.schedule.kappa(t)
        dkappa = self.schedule.dkappa(t)
        return SchedulerOutput(kappa, 1 - kappa, dkappa, -dkappa)


def _check_path(path):
    if isinstance(path, Schedule):
        return MixturePath(path)
    if not callable(getattr(path, "scheduler", None)):
        raise TypeError("path must have a scheduler(t) method returning alpha_t and d_alpha_t "
                        f"(a flow_matching MixtureDiscreteProbPath or MixturePath), got "
                        f"{type(path).__name__}")
    return path


class MixturePathGeneralizedKL(nn.Module):
    """flow_matching's generalized KL loss of a mixture path, per token i:

        loss_i = -w(t) [ p(x_t^i) - delta(x_1^i, x_t^i) + (1 - delta) log p(x_1^i) ],
        w(t) = d_alpha_t / (1 - alpha_t)  (or the given ``jump_coefficient``),

    with p = softmax(logits) over all V columns. Written as
    ``w [x_t != x_1] CE(x_1) + w (delta - p(x_t))``. What is fused: the cross-entropy term is
    one ``fused_tcsm_loss`` call (divergence "kl", data target x_1, weight w [x_t != x_1]);
    p(x_t) = exp(-CE(x_t)) comes from a second ``fused_tcsm_loss`` call with target x_t and
    per-row output. Only (B, d)-sized elementwise torch ops combine the two, so no (N, V)
    intermediate is built beyond what the fused op keeps for its backward (one gradient buffer
    per call). Values and gradients equal flow_matching's (float32 math).
    """

    def __init__(self, path, reduction: str = "mean"):
        super().__init__()
        _checks.choice("reduction", reduction, ("none", "mean", "sum"))
        self.path = _check_path(path)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, x_1: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                jump_coefficient: Optional[torch.Tensor] = None) -> torch.Tensor:
        """logits (B, d..., V), x_1 and x_t (B, d...) ids, t (B,); loss per ``reduction``."""
        _checks.tensor("x_1", x_1, _checks.INDEX_DTYPES)
        _checks.tensor("x_t", x_t, _checks.INDEX_DTYPES)
        if x_t.shape != x_1.shape:
            raise ValueError(f"x_t must have the shape of x_1 {tuple(x_1.shape)}, got "
                             f"{tuple(x_t.shape)}")
        if x_1.dim() < 1:
            raise ValueError("x_1 must have shape (batch, ...)")
        if jump_coefficient is None:
            sched = self.path.scheduler(t)
            jump_coefficient = sched.d_alpha_t / (1 - sched.alpha_t)
        elif jump_coefficient.shape != x_1.shape[:1]:
            raise ValueError("jump_coefficient must be a vector of shape (batch,)")
        if jump_coefficient.numel() != x_1.shape[0]:
            raise ValueError(f"t must have shape ({x_1.shape[0]},), got {tuple(t.shape)}")
        coef = jump_coefficient.reshape((-1,) + (1,) * (x_1.dim() - 1)).expand(x_1.shape)
        same = x_t == x_1
        loss = _fused_loss()
        cross_entropy = loss(logits, x_1, divergence="kl", reduction="none",
                             weight=torch.where(same, 0, coef).float())
        p_xt = torch.exp(-loss(logits, x_t, divergence="kl", reduction="none"))
        per_token = cross_entropy + coef * (same.to(p_xt.dtype) - p_xt)
        if self.reduction == "mean":
            return per_token.mean()
        if self.reduction == "sum":
            return per_token.sum()
        return per_token


def _nearest_indices(time_grid: torch.Tensor, grid: torch.Tensor) -> set:
    """Indices of the points of ``grid`` nearest to each entry of ``time_grid``."""
    distance = (time_grid.double()[:, None] - grid.double()[None, :]).abs()
    return set(distance.argmin(dim=1).tolist())


class MixtureDiscreteEulerSolver:
    """flow_matching's Euler CTMC solver of a mixture path, each step one fused ``ctmc_step``.

    ``model(x=x_t, t=t (B,), **model_extras)`` returns posterior probabilities (..., V) like
    flow_matching's wrapped models. In a step from t to t + h every position moves to
    x1 ~ p_{1|t} with probability 1 - exp(-h d_alpha_t / (1 - alpha_t)) (a move to x1 = x_t is
    no move, as in flow_matching); the last step sets x_t = x1 everywhere. For a mask-source path
    this unmasks everything at t = 1. The divergence-free term is not supported
    (``div_free`` must be 0). Randomness: a Philox seed drawn from torch's global generator per
    call, so ``torch.manual_seed`` makes runs reproducible (the random stream differs from
    flow_matching's). Probabilities are clamped to float32's smallest normal number before the
    log, giving zero-probability tokens a relative weight below 1e-37.
    """

    def __init__(self, model, path, vocabulary_size: int,
                 source_distribution_p: Optional[torch.Tensor] = None):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if isinstance(vocabulary_size, bool) or not isinstance(vocabulary_size, int):
            raise TypeError(f"vocabulary_size must be an int, got {type(vocabulary_size).__name__}")
        if vocabulary_size < 1:
            raise ValueError(f"vocabulary_size must be >= 1, got {vocabulary_size}")
        if source_distribution_p is not None and source_distribution_p.shape != (vocabulary_size,):
            raise ValueError(f"source_distribution_p must have shape ({vocabulary_size},), got "
                             f"{tuple(source_distribution_p.shape)}")
        self.model = model
        self.path = _check_path(path)
        self.vocabulary_size = vocabulary_size
        self.source_distribution_p = source_distribution_p

    def sample(self, x_init: torch.Tensor, step_size: Optional[float], div_free=0.0,
               dtype_categorical: torch.dtype = torch.float32,
               time_grid: torch.Tensor = torch.tensor([0.0, 1.0]),
               return_intermediates: bool = False, verbose: bool = False,
               enable_grad: bool = False, **model_extras) -> torch.Tensor:
        """x_init (B, ...) ids -> x at time_grid[-1]; with ``return_intermediates`` a stack of
        the states at the times of ``time_grid`` (every grid point when ``step_size`` is None,
        else the nearest uniform-step points), like flow_matching."""
        if callable(div_free) or div_free != 0.0:
            raise ValueError("div_free != 0 is not supported by this adapter")
        _checks.tensor("x_init", x_init, _checks.INDEX_DTYPES)
        time_grid = time_grid.to(device=x_init.device)
        if step_size is None:
            grid = time_grid
        else:
            t_init, t_final = float(time_grid[0]), float(time_grid[-1])
            if not t_final - t_init > step_size:
                raise ValueError(f"the time interval [{t_init}, {t_final}] must be longer than "
                                 f"step_size={step_size}")
            n = math.ceil((t_final - t_init) / step_size)
            grid = torch.tensor([t_init + step_size * i for i in range(n)] + [t_final],
                                device=x_init.device)
        n_steps = grid.numel() - 1
        if n_steps < 1:
            raise ValueError("time_grid must hold at least two times")
        keep = set(range(n_steps + 1)) if step_size is None else _nearest_indices(time_grid, grid)
        seed = int(torch.randint(0, 2**62, (1,)))
        step_op = _step_op()
        tiny = torch.finfo(torch.float32).tiny
        x_t = x_init.clone()
        states = [x_init.clone()] if return_intermediates else []
        with torch.set_grad_enabled(enable_grad):
            for i in progress_steps(n_steps, verbose, desc="NFE"):
                t = grid[i:i + 1]
                probs = self.model(x=x_t, t=t.repeat(x_t.shape[0]), **model_extras)
                logits = torch.log(probs.detach().to(dtype_categorical).clamp_min(tiny))
                if i == n_steps - 1:
                    jump = torch.ones(1, device=x_t.device)
                else:
                    sched = self.path.scheduler(t)
                    h = grid[i + 1:i + 2] - t
                    jump = -torch.expm1(-h * sched.d_alpha_t / (1 - sched.alpha_t))
                x_t = step_op(logits, x_t, jump.clamp(0, 1), seed=seed, offset=i).to(x_init.dtype)
                if return_intermediates and i + 1 in keep:
                    states.append(x_t)
        if not return_intermediates:
            return x_t
        stacked = torch.stack(states, dim=0)
        return stacked if step_size is None else stacked[torch.argsort(time_grid)]
