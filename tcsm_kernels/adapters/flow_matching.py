"""Drop-ins for facebookresearch/flow_matching's discrete loss and Euler solver (v1.0.10).

``path`` is duck-typed as in flow_matching: anything with ``path.scheduler(t)`` returning an
object with ``alpha_t`` and ``d_alpha_t`` (their ``MixtureDiscreteProbPath``). ``MixturePath``
wraps one of this library's schedules the same way, so flow_matching need not be installed.
Time runs as in flow_matching and this library: t = 1 is data, alpha_t = kappa_t.
"""
from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional, Union

import torch
from torch import nn
from torch.nn.modules.loss import _Loss

from .. import _checks, philox
from ..ops.ctmc_step import ctmc_step
from ..ops.loss import fused_tcsm_loss
from ..sampling.skeleton import StepLoop
from ..schedules import Schedule
from . import _args

REDUCTIONS = ("none", "mean", "sum")
SOURCE_OFFSET = 2**62  # + step index: Philox offset of the divergence-free (source) jumps


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


class _CrossEntropyAndProb(torch.autograd.Function):
    """(CE(x_1), p(x_t)) per token of softmax(logits (..., V)), from ONE fused loss call.

    The call gives CE = LSE - z[x_1] and keeps its gradient p - e[x_1] (one (N, V) buffer);
    p(x_t) = exp(z[x_t] - z[x_1] - CE) is O(N). Since d p(x_t) / dz = p(x_t) (e[x_t] - p):
        d/dz [g_ce CE + g_p p(x_t)] = (g_ce - g_p p(x_t)) (p - e[x_1])
                                      + g_p p(x_t) (e[x_t] - e[x_1]),
    i.e. the kept buffer scaled per row, plus two entries per row, written into that buffer.
    """

    @staticmethod
    def forward(ctx, logits, x_1, x_t):
        rows = logits.detach().requires_grad_(ctx.needs_input_grad[0])
        with torch.set_grad_enabled(ctx.needs_input_grad[0]):
            cross_entropy = fused_tcsm_loss(rows, x_1, reduction="none")
        gap = (logits.gather(-1, x_t[..., None]) - logits.gather(-1, x_1[..., None]))[..., 0]
        p_xt = torch.exp(gap.to(cross_entropy.dtype) - cross_entropy.detach())
        ctx.rows, ctx.cross_entropy = rows, cross_entropy
        ctx.save_for_backward(x_1, x_t, p_xt)
        return cross_entropy.detach(), p_xt

    @staticmethod
    def backward(ctx, grad_ce, grad_p):
        x_1, x_t, p_xt = ctx.saved_tensors
        moved = grad_p * p_xt
        (grad,) = torch.autograd.grad(ctx.cross_entropy, ctx.rows, grad_ce - moved)
        moved = moved[..., None].to(grad.dtype)
        grad.scatter_add_(-1, x_t[..., None], moved)
        grad.scatter_add_(-1, x_1[..., None], -moved)
        return grad, None, None


class MixturePathGeneralizedKL(_Loss):
    """flow_matching's generalized KL loss of a mixture path, per token i:

        loss_i = -w(t) [ p(x_t^i) - delta(x_1^i, x_t^i) + (1 - delta) log p(x_1^i) ],
        w(t) = d_alpha_t / (1 - alpha_t),

    p = softmax(logits) over all V columns. Fused: CE(x_1) = -log p(x_1) and p(x_t) come from one
    ``fused_tcsm_loss`` call (``_CrossEntropyAndProb``), so one (N, V) gradient buffer is all the
    loss keeps; the rest is (B, d)-sized. ``reduction`` ("mean" over all tokens, "sum", "none")
    is checked when the loss runs, as flow_matching does. Values and gradients equal
    flow_matching's (float32 math).
    """

    def __init__(self, path, reduction: str = "mean") -> None:
        super().__init__(None, None, reduction)
        self.path = _check_path(path)

    def forward(self, logits: torch.Tensor, x_1: torch.Tensor, x_t: torch.Tensor,
                t: torch.Tensor) -> torch.Tensor:
        """logits (B, d..., V), x_1 and x_t (B, d...) ids, t (B,) times; loss per reduction."""
        vocab, batch_shape = _checks.rows_and_ids("logits", logits, "x_1", x_1)
        _checks.tensor("x_t", x_t, _checks.INDEX_DTYPES)
        if x_t.shape != x_1.shape:
            raise ValueError(f"x_t must have the shape of x_1 {batch_shape}, got "
                             f"{tuple(x_t.shape)}")
        if x_1.dim() < 1:
            raise ValueError("x_1 must have shape (batch, ...)")
        _checks.tensor("t", t, _checks.FLOAT_DTYPES)
        _checks.same_device("t", t, logits, "logits")
        _checks.choice("reduction", self.reduction, REDUCTIONS)
        if _checks.resolve_check(None, logits.device):
            _checks.ids_in_range("x_1", x_1, vocab)
            _checks.ids_in_range("x_t", x_t, vocab)
        sched = self.path.scheduler(t)
        jump_coefficient = sched.d_alpha_t / (1 - sched.alpha_t)
        coef = _checks.broadcast("t", jump_coefficient.reshape(
            jump_coefficient.shape + (1,) * (x_1.dim() - 1)), batch_shape)
        cross_entropy, p_xt = _CrossEntropyAndProb.apply(logits, x_1.long(), x_t.long())
        delta = (x_t == x_1).to(cross_entropy.dtype)
        loss = -coef * (p_xt - delta - (1 - delta) * cross_entropy)
        if self.reduction == "mean":
            return loss.mean()
        return loss.sum() if self.reduction == "sum" else loss


def _nearest_times(time_grid: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """For each time of ``time_grid`` the nearest point of ``grid`` (flow_matching's rule)."""
    return grid[(time_grid[:, None] - grid[None, :]).abs().argmin(dim=1)]


class MixtureDiscreteEulerSolver(nn.Module):
    """flow_matching's Euler CTMC solver of a mixture path, each step one fused ``ctmc_step``.

    ``model(x=x_t, t=t (B,), **model_extras)`` returns posterior probabilities (..., V) like
    flow_matching's wrapped models; it sees x_t with x_init's dtype. A step from t to t + h, per
    position, with w = d_alpha_t / (1 - alpha_t) and c = div_free(t) (its term only for c > 0,
    and then ``source_distribution_p`` = p_0 is needed), is flow_matching's:
        x_1 ~ p_{1|t};  rates u(y) = (1 + c) w [y = x_1] + (c d_alpha_t / alpha_t) p_0(y), y != x_t;
        with probability 1 - exp(-h sum_y u(y)) jump to y ~ u / sum_y u,
    drawn as a move to x_1 by ``ctmc_step`` plus, for c > 0, an O(N) draw of the p_0 part (by
    inverse CDF). The last step sets x_t = x_1. Results are int64 (flow_matching's x_1 is).

    Randomness: one Philox seed per ``sample`` call, drawn from ``generator`` (default torch's
    global generator: ``torch.manual_seed`` makes runs reproducible); the stream differs from
    flow_matching's, the distribution is the same. ``backend`` goes to ``ctmc_step``.
    """

    def __init__(self, model, path, vocabulary_size: int,
                 source_distribution_p: Optional[torch.Tensor] = None, *,
                 generator: Optional[torch.Generator] = None, backend: str = "auto"):
        super().__init__()
        _checks.callable_as("model", model, "model(x=x_t, t=t, **model_extras)")
        vocabulary_size = _args.integer("vocabulary_size", vocabulary_size, 1)
        if source_distribution_p is not None:
            _checks.tensor("source_distribution_p", source_distribution_p, _checks.FLOAT_DTYPES)
            if source_distribution_p.shape != (vocabulary_size,):
                raise ValueError(f"source_distribution_p must have shape ({vocabulary_size},), "
                                 f"got {tuple(source_distribution_p.shape)}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.model = model
        self.path = _check_path(path)
        self.vocabulary_size = vocabulary_size
        self.source_distribution_p = source_distribution_p
        self.generator = generator
        self.backend = _checks.choice("backend", backend, _checks.BACKENDS)

    @torch.no_grad()
    def sample(self, x_init: torch.Tensor, step_size: Optional[float],
               div_free: Union[float, Callable[[torch.Tensor], float]] = 0.0,
               dtype_categorical: torch.dtype = torch.float32,
               time_grid: torch.Tensor = torch.tensor([0.0, 1.0]),
               return_intermediates: bool = False, verbose: bool = False,
               **model_extras) -> torch.Tensor:
        """x_init (B, ...) ids -> x at time_grid[-1] (int64). ``step_size`` None steps on
        ``time_grid``; a number steps uniformly from time_grid[0] to time_grid[-1]. With
        ``return_intermediates``, a stack of the states at the times of ``time_grid`` (with a
        step size: the nearest grid points, in time_grid's order), like flow_matching.
        ``div_free``: a number, or a function of t (the step's time as a (1,) tensor, as
        flow_matching passes it); any value but 0 needs ``source_distribution_p``."""
        _checks.tensor("x_init", x_init, _checks.INDEX_DTYPES)
        if not callable(div_free):
            div_free = _args.real("div_free", div_free)
        if (callable(div_free) or div_free != 0) and self.source_distribution_p is None:
            raise ValueError("div_free != 0 needs source_distribution_p (the constructor's)")
        if not (isinstance(dtype_categorical, torch.dtype) and dtype_categorical.is_floating_point):
            raise TypeError(f"dtype_categorical must be a floating torch.dtype, got "
                            f"{dtype_categorical!r}")
        _checks.tensor("time_grid", time_grid, _checks.FLOAT_DTYPES)
        if time_grid.dim() != 1 or time_grid.numel() < 2:
            raise ValueError(f"time_grid must be a 1-D tensor of at least two times, got shape "
                             f"{tuple(time_grid.shape)}")
        time_grid = time_grid.to(device=x_init.device)
        grid = time_grid if step_size is None else self._uniform_grid(time_grid, step_size)
        kept = time_grid if step_size is None else _nearest_times(time_grid, grid)
        # flow_matching keeps the state after a step when t + h is one of the kept times
        t_next = grid[:-1] + (grid[1:] - grid[:-1])
        keep = (t_next[:, None] == kept[None, :]).any(dim=1).tolist()

        steps = _EulerSteps(self, grid, keep, div_free, dtype_categorical, x_init.dtype,
                            _args.draw_seed(self.generator), model_extras)
        x_t = x_init.long()
        if not return_intermediates:
            return steps.run(self.model, x_t, progress=verbose)
        _, states = steps.run(self.model, x_t, progress=verbose, return_trajectory=True)
        states = [x_t] + states
        stacked = torch.stack(states, dim=0)
        if step_size is None:
            return stacked
        if len(states) != time_grid.numel():  # flow_matching fails here with an IndexError
            raise ValueError(f"time_grid {time_grid.tolist()}: with a step_size, each time must "
                             "have its own nearest step point in [time_grid[0], time_grid[-1]]")
        return stacked[torch.argsort(time_grid)]

    @staticmethod
    def _uniform_grid(time_grid: torch.Tensor, step_size) -> torch.Tensor:
        """flow_matching's uniform discretisation: t_init + step_size * i, then t_final."""
        step_size = _args.real("step_size", step_size)
        t_init, t_final = time_grid[0].item(), time_grid[-1].item()
        if not t_final - t_init > step_size:
            raise ValueError(f"the time interval [{t_init}, {t_final}] must be longer than "
                             f"step_size={step_size}")
        n_steps = math.ceil((t_final - t_init) / step_size)
        return torch.tensor([t_init + step_size * i for i in range(n_steps)] + [t_final],
                            device=time_grid.device)


class _EulerSteps(StepLoop):
    """The steps of one ``MixtureDiscreteEulerSolver.sample`` call on ``grid`` (n + 1,): step k
    calls the model at grid[k] and moves x to grid[k + 1]; ``keep[k]``: the trajectory keeps
    the state after step k."""

    progress_label = "NFE"

    def __init__(self, solver: MixtureDiscreteEulerSolver, grid: torch.Tensor, keep: List[bool],
                 div_free: Union[float, Callable[[torch.Tensor], float]],
                 dtype_categorical: torch.dtype, x_dtype: torch.dtype, seed: int,
                 model_extras: dict):
        self.solver, self.grid, self.keep, self.div_free = solver, grid, keep, div_free
        self.dtype_categorical, self.x_dtype = dtype_categorical, x_dtype
        self.seed, self.model_extras = seed, model_extras
        self.steps = grid.numel() - 1

    def logits(self, model, x: torch.Tensor, k: int) -> torch.Tensor:
        """log of the model's probabilities (B, ..., V) in dtype_categorical; the model sees x
        with x_init's dtype."""
        probs = model(x=x.to(self.x_dtype), t=self.grid[k:k + 1].repeat(x.shape[0]),
                      **self.model_extras)
        _checks.tensor("the model's output", probs, _checks.FLOAT_DTYPES)
        shape = x.shape + (self.solver.vocabulary_size,)
        if probs.shape != shape:
            raise ValueError(f"the model must return probabilities of shape {tuple(shape)}, got "
                             f"{tuple(probs.shape)}")
        return probs.to(self.dtype_categorical).log()

    def update(self, k: int, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if k == self.steps - 1:  # the last step sets x_t = x_1
            return ctmc_step(logits, x, torch.ones((), device=x.device), seed=self.seed,
                             offset=k, backend=self.solver.backend)
        t = self.grid[k:k + 1]
        div_free_t = float(self.div_free(t)) if callable(self.div_free) else self.div_free
        return self._euler_step(logits, x, t, self.grid[k + 1:k + 2] - t, div_free_t, k)

    def keeps(self, k: int) -> bool:
        return self.keep[k]

    def _euler_step(self, logits: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                    h: torch.Tensor, div_free_t: float, step: int) -> torch.Tensor:
        """One Euler step (not the last) from t to t + h (each (1,)); x_t (B, ...) int64."""
        solver, seed = self.solver, self.seed
        sched = solver.path.scheduler(t=t)
        to_x1 = sched.d_alpha_t / (1 - sched.alpha_t)  # the rate toward x_1, w
        if not div_free_t > 0:
            return ctmc_step(logits, x_t, (-torch.expm1(-h * to_x1)).clamp(0, 1), seed=seed,
                             offset=step, backend=solver.backend)
        if not bool((sched.alpha_t > 0).all()):
            raise ValueError(f"div_free > 0 at t={float(t)}, where alpha_t = 0: the source rate "
                             "d_alpha_t / alpha_t is not finite (start time_grid above 0 or "
                             "make div_free vanish there)")
        p0 = solver.source_distribution_p.to(device=x_t.device, dtype=torch.float64)
        cdf = p0.cumsum(0)
        p0_xt = p0[x_t]
        # rates out of x_t: (1 + c) w toward x_1, c d_alpha / alpha p_0(y) toward each y != x_t
        to_x1 = (1 + div_free_t) * to_x1.double()
        to_source = div_free_t * sched.d_alpha_t.double() / sched.alpha_t * (cdf[-1] - p0_xt)
        h = h.double()
        total = to_x1 + to_source
        moves = -torch.expm1(-h * total)
        via_x1 = torch.where(total > 0, moves * to_x1 / total, 0)
        via_source = torch.where(total > 0, moves * to_source / total, 0)
        out = ctmc_step(logits, x_t, via_x1, seed=seed, offset=step, return_x1=True,
                        backend=solver.backend)
        # P(source jump | the step op's outcome): all of it when x_1 = x_t (its x_1 part is
        # void), none after a move to x_1, else via_source / (1 - via_x1)
        p_source = torch.where(out.x1 == x_t, -torch.expm1(-h * to_source),
                               torch.where(out.x == x_t, via_source / (1 - via_x1), 0))
        u_jump, u_draw = (u.reshape(x_t.shape) for u in philox.row_uniforms(
            seed, SOURCE_OFFSET + step, x_t.numel(), device=x_t.device))
        # y ~ p_0 without x_t: inverse CDF of a mass in [0, total - p_0(x_t)), x_t's cell skipped
        mass = u_draw * (cdf[-1] - p0_xt)
        mass = mass + torch.where(mass >= cdf[x_t] - p0_xt, p0_xt, 0)
        y = torch.searchsorted(cdf, mass, right=True).clamp(max=p0.numel() - 1)
        return torch.where(u_jump < p_source, y, out.x)
