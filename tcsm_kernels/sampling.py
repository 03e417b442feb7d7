"""Sampler loops built on the fused CTMC step (SPEC 1, 7).

Any denoiser ``model(x_t, t) -> logits`` works: x_t (B, L) int64 token ids, t (B,) float32 in
[0, 1] (t = 1 is clean data, SPEC 1), logits (B, L, V). Every step is one model call and one
call of ``tcsm_kernels.ops.ctmc_step.ctmc_step`` keyed by (seed, offset = step index), so a run
is reproducible by its seed.

Masked samplers plan first, then step. Which positions change in which step depends only on the
seed, the schedule and the initial mask, never on the model (the jump decision of the masked
path ignores the logits; confidence unmasking fixes how many tokens each step reveals). So the
plan is drawn on the device before the loop: for method "exact"/"euler" each position's
unmasking step (inverse CDF of its first-jump time under the schedule's per-step jump
probabilities, Philox uniforms keyed by (seed, ``PLAN_OFFSET``, position)); for "confidence" the
number of tokens each sequence reveals per step. The step op then receives the plan as a 0/1
per-position jump probability (or a count), which gives exactly the distribution of per-step
Bernoulli jumps. Caching uses the plan: a step that changes no token is skipped (no model call,
no step op); the skip list is read to the host once, before the loop, so the loop itself never
syncs, and the output equals ``cache=False`` bit for bit, for time-conditioned models too (a
skipped step could not have changed x; the model is always evaluated at the current (x, t)).
"""
from __future__ import annotations

import math
import sys
from typing import Callable, List, NamedTuple, Optional, Tuple, Union

import torch

from . import _checks, philox
from .schedules import LinearSchedule, Schedule, get_schedule

METHODS = ("exact", "euler", "confidence")
CONFIDENCES = ("low_confidence", "margin", "entropy", "random")
PLAN_OFFSET = 2**63 - 1  # Philox offset of the unmasking plan; steps use offsets 0..steps-1
RANDOM_KEY_OFFSET = 2**62  # + step index: Philox offset of the keys of confidence="random"

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SampleResult = Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]


def _step_op():
    from .ops.ctmc_step import ctmc_step  # imported on use: the op module loads its backends
    return ctmc_step


def progress_steps(total: int, enabled: bool, desc: str = "sampling"):
    """range(total), with a progress bar on stderr when enabled (tqdm if installed)."""
    if not enabled:
        yield from range(total)
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(range(total), desc=desc, file=sys.stderr)
        return
    width = 30
    for k in range(total):
        yield k
        done = (k + 1) * width // total
        sys.stderr.write(f"\r{desc} [{'#' * done}{' ' * (width - done)}] {k + 1}/{total}")
        sys.stderr.flush()
    sys.stderr.write("\n")


# ----------------------------------------------------------------------------- validation

def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _optional_positive_int(name: str, value) -> Optional[int]:
    return None if value is None else _positive_int(name, value)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def _check_model(model) -> None:
    if not callable(model):
        raise TypeError(f"model must be callable as model(x_t, t), got {type(model).__name__}")


def _check_tokens(x_init) -> torch.Tensor:
    _checks.tensor("x_init", x_init, _checks.INDEX_DTYPES)
    if x_init.dim() != 2:
        raise ValueError(f"x_init must have shape (B, L), got {tuple(x_init.shape)}")
    if x_init.numel() == 0:
        raise ValueError("x_init must be non-empty")
    return x_init


def _check_mask_id(mask_id) -> int:
    if isinstance(mask_id, bool) or not isinstance(mask_id, int):
        raise TypeError(f"mask_id must be an int, got {type(mask_id).__name__}")
    if mask_id < 0:
        raise ValueError(f"mask_id must be >= 0, got {mask_id}")
    return mask_id


def _check_frozen(frozen, x: torch.Tensor) -> torch.Tensor:
    if frozen is None:
        return torch.zeros_like(x, dtype=torch.bool)
    _checks.tensor("frozen", frozen, (torch.bool,))
    _checks.same_device("frozen", frozen, x, "x_init")
    if frozen.shape != x.shape:
        raise ValueError(f"frozen must have the shape of x_init {tuple(x.shape)}, "
                         f"got {tuple(frozen.shape)}")
    return frozen


def _resolve_schedule(schedule) -> Schedule:
    if schedule is None:
        return LinearSchedule()
    if isinstance(schedule, str):
        return get_schedule(schedule)
    if not isinstance(schedule, Schedule):
        raise TypeError("schedule must be a tcsm_kernels.schedules.Schedule, a schedule name or "
                        f"None, got {type(schedule).__name__}")
    return schedule


def _check_logits(logits, x: torch.Tensor, min_vocab: int) -> None:
    """Validate the first model output: float (B, L, V) with V >= min_vocab."""
    if not isinstance(logits, torch.Tensor) or logits.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError("model must return a floating-point tensor of logits (B, L, V), got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(x.shape):
        raise ValueError(f"model must return logits of shape {tuple(x.shape) + ('V',)}, got "
                         f"{tuple(logits.shape)}")
    if logits.shape[2] < min_vocab:
        raise ValueError(f"model returned V={logits.shape[2]} columns but at least {min_vocab} "
                         "are needed (mask_id must be a column of the logits)")
    if _checks.resolve_check(None, x.device):
        _checks.ids_in_range("x_init", x, logits.shape[2])


# ----------------------------------------------------------------------------- model calls

class _EagerModel:
    """Calls the denoiser as is."""

    def __init__(self, model: Denoiser):
        self.model = model

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x, t)


class _GraphedModel:
    """The denoiser captured once in a CUDA graph, replayed on static input buffers.

    Only the model forward is captured: the step op takes its Philox offset as a host integer,
    which a captured graph would freeze, so it is launched (one kernel) after each replay. The
    returned logits live in the graph's static output buffer until the next call.
    """

    def __init__(self, model: Denoiser, x: torch.Tensor, t: torch.Tensor, warmup: int = 2):
        self.static_x = x.clone()
        self.static_t = t.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                model(self.static_x, self.static_t)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_logits = model(self.static_x, self.static_t)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.static_x.copy_(x)
        self.static_t.copy_(t)
        self.graph.replay()
        return self.static_logits


def _model_runner(model: Denoiser, cuda_graph: bool, x: torch.Tensor, t: torch.Tensor):
    return _GraphedModel(model, x, t) if cuda_graph else _EagerModel(model)


def _check_cuda_graph(cuda_graph, x: torch.Tensor) -> bool:
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
    if cuda_graph and x.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs CUDA tensors; x_init is on {x.device}")
    return cuda_graph


# ----------------------------------------------------------------------------- plans

def _time_table(steps: int, batch: int, device) -> torch.Tensor:
    """(steps, B) float32: row k holds the model time t_k = k / steps for every sequence."""
    t = torch.arange(steps, dtype=torch.float64) / steps
    return t.to(device=device, dtype=torch.float32)[:, None].expand(steps, batch).contiguous()


def _jump_probs(schedule: Schedule, steps: int, method: str) -> torch.Tensor:
    """(steps,) float64 on the host: per-step jump probability on the grid k / steps; the last
    step (s = 1) is 1 so every remaining masked position jumps (SPEC 7)."""
    grid = torch.arange(steps + 1, dtype=torch.float64) / steps
    t, s = grid[:-1], grid[1:]
    jump = schedule.jump_prob_exact(t, s) if method == "exact" else schedule.jump_prob_euler(t, s)
    jump = jump.to(torch.float64).clone()
    jump[-1] = 1.0
    if not bool(torch.isfinite(jump).all()) or bool(((jump < 0) | (jump > 1)).any()):
        raise ValueError(f"schedule {schedule!r} gives jump probabilities outside [0, 1] on the "
                         f"{steps}-step grid")
    return jump


class _JumpPlan(NamedTuple):
    """method exact/euler: the step (0..steps-1) in which each position unmasks; ``steps`` for
    positions that never change (frozen or not masked)."""

    unmask_step: torch.Tensor  # (B, L) int64

    def changes(self, steps: int) -> torch.Tensor:
        counts = torch.bincount(self.unmask_step.flatten(), minlength=steps + 1)
        return counts[:steps] > 0


def _jump_plan(movable: torch.Tensor, schedule: Schedule, steps: int, method: str,
               seed: int) -> _JumpPlan:
    """First-jump step of each movable position, P(step <= k) = 1 - prod_{j <= k}(1 - p_j)."""
    jump = _jump_probs(schedule, steps, method)
    unmasked_by = 1 - torch.cumprod(1 - jump, dim=0)
    unmasked_by[-1] = 1.0
    u, _ = philox.row_uniforms(seed, PLAN_OFFSET, movable.numel(), device=movable.device)
    step = torch.searchsorted(unmasked_by.to(movable.device), u, right=True).reshape(movable.shape)
    return _JumpPlan(torch.where(movable, step, torch.full_like(step, steps)))


class _CountPlan(NamedTuple):
    """method confidence: block of each position (-1: never changes), the block each step works
    on, and how many tokens each sequence reveals in each step."""

    block_id: torch.Tensor  # (B, L) int64
    block_of_step: List[int]  # (steps,) on the host
    counts: torch.Tensor  # (B, steps) int64
    leftover: torch.Tensor  # () bool: some movable position is still masked after the last step

    def changes(self, steps: int) -> torch.Tensor:
        return self.counts.sum(0) > 0


def _count_plan(movable: torch.Tensor, schedule: Schedule, steps: int,
                tokens_per_step: Optional[int], block_length: Optional[int]) -> _CountPlan:
    """Blocks: block j of a sequence is its j-th run of ``block_length`` movable positions in
    position order (with a prompt prefix: LLaDA's blocks over the generated part). Steps are
    split evenly over the blocks. Within a block of S steps, the number revealed by local step
    i is ``tokens_per_step``, or round(m F_i) - round(m F_{i-1}) with F_i the schedule's
    fraction unmasked by then, (kappa((i+1)/S) - kappa(0)) / (1 - kappa(0)), so all m are
    revealed after S steps."""
    batch = movable.shape[0]
    device = movable.device
    if block_length is None:
        block_id = torch.where(movable, 0, -1)
        num_blocks = 1
    else:
        rank = movable.long().cumsum(1) - 1
        block_id = torch.where(movable, rank // block_length, -1)
        most_masked = int(movable.sum(1).max())  # the one host read that sizes the block loop
        num_blocks = max(1, math.ceil(most_masked / block_length))
        if steps < num_blocks:
            raise ValueError(f"steps={steps} is fewer than the {num_blocks} blocks of "
                             f"block_length={block_length}; each block needs at least one step")
    block_steps = [steps // num_blocks + (j < steps % num_blocks) for j in range(num_blocks)]
    block_of_step = [j for j, n in enumerate(block_steps) for _ in range(n)]
    local_step = [i for n in block_steps for i in range(n)]

    slot = torch.where(block_id >= 0, block_id, num_blocks)
    per_block = torch.zeros(batch, num_blocks + 1, dtype=torch.int64, device=device)
    per_block.scatter_add_(1, slot, movable.long())
    masked = per_block[:, torch.tensor(block_of_step, device=device)]  # (B, steps)
    local = torch.tensor(local_step, dtype=torch.int64, device=device)

    if tokens_per_step is not None:
        done_after = torch.minimum(masked, tokens_per_step * (local + 1))
        done_before = torch.minimum(masked, tokens_per_step * local)
    else:
        frac_after, frac_before = [], []
        for n in block_steps:
            grid = torch.arange(n + 1, dtype=torch.float64) / n
            kappa = schedule.kappa(grid).to(torch.float64)
            frac = ((kappa - kappa[0]) / (1 - kappa[0])).clamp(0, 1)
            frac[-1] = 1.0
            frac_after.append(frac[1:])
            frac_before.append(frac[:-1])
        frac_after = torch.cat(frac_after).to(device)
        frac_before = torch.cat(frac_before).to(device)
        m = masked.double()
        done_after = torch.floor(m * frac_after + 0.5).long()
        done_before = torch.floor(m * frac_before + 0.5).long()
    counts = (done_after - done_before).clamp(min=0)
    leftover = (per_block[:, :num_blocks].sum(1) > counts.sum(1)).any()
    return _CountPlan(block_id, block_of_step, counts, leftover)


# ----------------------------------------------------------------------------- steps

def _confidence_scores(out, kind: str, seed: int, step: int) -> torch.Tensor:
    """(B, L) score, higher = unmask first."""
    if kind == "low_confidence":
        return out.prob
    if kind == "margin":
        return out.margin
    if kind == "entropy":
        return -out.entropy
    keys, _ = philox.row_uniforms(seed, RANDOM_KEY_OFFSET + step, out.x.numel(),
                                  device=out.x.device)
    return keys.reshape(out.x.shape)


def top_per_row(score: torch.Tensor, eligible: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: per row the ``count[b]`` highest-scoring eligible positions (ties: lower
    position first); fewer when the row has fewer eligible positions. No host sync."""
    score = torch.where(eligible, score.double(), float("-inf"))
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    positions = torch.arange(score.shape[1], device=score.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return eligible & (rank < count[:, None])


def _greedy_unmasked(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(B, L) argmax of the logits with the mask column excluded."""
    scores = logits.float().clone()
    scores[..., mask_id] = float("-inf")
    return scores.argmax(dim=-1)


@torch.no_grad()
def sample_masked(model: Denoiser, x_init: torch.Tensor, *, steps: int, mask_id: int,
                  schedule=None, method: str = "exact", tokens_per_step: Optional[int] = None,
                  confidence: str = "low_confidence", block_length: Optional[int] = None,
                  frozen: Optional[torch.Tensor] = None, temperature: float = 1.0,
                  cache: bool = True, final_denoise: bool = True, seed: int = 0,
                  progress: bool = False, return_trajectory: bool = False,
                  cuda_graph: bool = False) -> SampleResult:
    """Masked (absorbing) diffusion sampling from t = 0 to t = 1 in ``steps`` steps.

    x_init (B, L) holds ``mask_id`` where tokens are to be generated; other positions, and every
    position where ``frozen`` (B, L) is true, never change. ``schedule`` is a Schedule, a name
    or None (linear). The model is called at t_k = k / steps for step k.

    method:
      - "exact": each masked position unmasks in step k with probability
        (kappa(t_{k+1}) - kappa(t_k)) / (1 - kappa(t_k)); "euler": 1 - exp(-h dkappa/(1 - kappa)).
        In the last step every remaining position unmasks. The new token is x1 ~ softmax(z / T)
        without the mask column, drawn by the step op at the model's current logits.
      - "confidence" (LLaDA / MaskGIT): each step draws x1 for every position and reveals per
        sequence the ``tokens_per_step`` (default: schedule-derived counts that reveal
        everything in ``steps`` steps) masked positions scoring highest by ``confidence``:
        p(x1) ("low_confidence", under softmax(z / T)), top-1 minus top-2 probability
        ("margin"), negative entropy ("entropy") or Philox random keys ("random").
        ``block_length``: semi-autoregressive blocks of that many positions to generate,
        revealed block after block, steps split evenly over blocks.

    cache: skip the steps that change no token (see the module docstring); identical output,
    fewer model calls. Before the loop at most two small device-to-host reads happen (the skip
    list; the block count when ``block_length`` is set); none inside the loop.
    final_denoise: with "confidence" and ``tokens_per_step``, masked positions may remain after
    the last step; they get the argmax (mask column excluded) of one more model call at the last
    grid time. With ``cache`` that call is skipped when the plan leaves no mask.
    cuda_graph: on CUDA, capture the model forward once in a CUDA graph (after warm-up, static
    input buffers updated in place) and replay it; the step op runs after each replay, since
    its Philox offset is a host integer that a captured graph would freeze. Same output as
    eager. ValueError for non-CUDA tensors.

    Returns the final x (B, L) with the dtype of x_init, and with ``return_trajectory`` also the
    list of the ``steps`` states after each step (before the final denoise).
    """
    _check_model(model)
    x = _check_tokens(x_init)
    steps = _positive_int("steps", steps)
    mask_id = _check_mask_id(mask_id)
    _checks.choice("method", method, METHODS)
    _checks.choice("confidence", confidence, CONFIDENCES)
    tokens_per_step = _optional_positive_int("tokens_per_step", tokens_per_step)
    block_length = _optional_positive_int("block_length", block_length)
    if method != "confidence" and (tokens_per_step is not None or block_length is not None):
        raise ValueError("tokens_per_step and block_length apply to method='confidence' only, "
                         f"got method={method!r}")
    frozen = _check_frozen(frozen, x)
    temperature = _checks.positive_finite("temperature", temperature)
    seed = _check_seed(seed)
    schedule = _resolve_schedule(schedule)
    cuda_graph = _check_cuda_graph(cuda_graph, x)

    x = x.long()
    batch = x.shape[0]
    movable = (x == mask_id) & ~frozen
    if method == "confidence":
        plan = _count_plan(movable, schedule, steps, tokens_per_step, block_length)
        may_leave_masks = final_denoise and tokens_per_step is not None
    else:
        plan = _jump_plan(movable, schedule, steps, method, seed)
        may_leave_masks = False
    if cache:
        flags = plan.changes(steps)
        if may_leave_masks:
            flags = torch.cat([flags, plan.leftover[None]])
        flags = flags.tolist()  # the one read of the plan
        active = flags[:steps]
        may_leave_masks = may_leave_masks and flags[-1]
    else:
        active = [True] * steps

    times = _time_table(steps, batch, x.device)
    step_op = _step_op()
    no_jump = torch.zeros((), dtype=torch.float32, device=x.device)
    run_model = None
    trajectory = []
    for k in progress_steps(steps, progress):
        if active[k]:
            if run_model is None:
                run_model = _model_runner(model, cuda_graph, x, times[k])
                logits = run_model(x, times[k])
                _check_logits(logits, x, mask_id + 1)
            else:
                logits = run_model(x, times[k])
            if method == "confidence":
                out = step_op(logits, x, no_jump, mask_id=mask_id, temperature=temperature,
                              seed=seed, offset=k, return_x1=True, return_confidence=True)
                eligible = (x == mask_id) & (plan.block_id == plan.block_of_step[k])
                take = top_per_row(_confidence_scores(out, confidence, seed, k), eligible,
                                   plan.counts[:, k])
                x = torch.where(take, out.x1, x)
            else:
                jump = (plan.unmask_step == k).float()
                x = step_op(logits, x, jump, mask_id=mask_id, temperature=temperature,
                            seed=seed, offset=k)
        if return_trajectory:
            trajectory.append(x)
    if may_leave_masks:
        if run_model is None:
            run_model = _model_runner(model, cuda_graph, x, times[-1])
        logits = run_model(x, times[-1])
        _check_logits(logits, x, mask_id + 1)
        x = torch.where(movable & (x == mask_id), _greedy_unmasked(logits, mask_id), x)

    x = x.to(x_init.dtype)
    if return_trajectory:
        return x, [state.to(x_init.dtype) for state in trajectory]
    return x


@torch.no_grad()
def sample_uniform(model: Denoiser, x_init: torch.Tensor, *, steps: int, schedule=None,
                   temperature: float = 1.0, seed: int = 0, progress: bool = False,
                   return_trajectory: bool = False) -> SampleResult:
    """Uniform-state discrete flow matching: Euler steps from t = 0 to 1.

    x_init (B, L) is the noise sample (e.g. uniform ids). In step k (t_k = k / steps) every
    position jumps with probability 1 - exp(-h dkappa/(1 - kappa)) to x1 ~ softmax(z / T) drawn
    from the model's logits (B, L, V); in the last step every position jumps. One step op per
    step, keyed by (seed, k). Returns x (B, L) and, with ``return_trajectory``, the ``steps``
    states after each step.
    """
    _check_model(model)
    x = _check_tokens(x_init)
    steps = _positive_int("steps", steps)
    temperature = _checks.positive_finite("temperature", temperature)
    seed = _check_seed(seed)
    schedule = _resolve_schedule(schedule)

    x = x.long()
    times = _time_table(steps, x.shape[0], x.device)
    jumps = _jump_probs(schedule, steps, "euler").to(device=x.device, dtype=torch.float32)
    step_op = _step_op()
    trajectory = []
    for k in progress_steps(steps, progress):
        logits = model(x, times[k])
        if k == 0:
            _check_logits(logits, x, 1)
        x = step_op(logits, x, jumps[k], temperature=temperature, seed=seed, offset=k)
        if return_trajectory:
            trajectory.append(x)
    x = x.to(x_init.dtype)
    if return_trajectory:
        return x, [state.to(x_init.dtype) for state in trajectory]
    return x
