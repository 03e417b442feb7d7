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

With ``cuda_graph=True`` (CUDA) the whole loop is captured once in a CUDA graph and replayed:
every step runs, the seed is a device int64 read by the Philox draws at launch, and nothing in
the loop reads the device or allocates by value.
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


# ----------------------------------------------------------------------------- CUDA graphs

def _check_cuda_graph(cuda_graph, x: torch.Tensor) -> bool:
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
    if cuda_graph and x.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs CUDA tensors; x_init is on {x.device}")
    return cuda_graph


class _CapturedLoop:
    """A whole sampler loop ``body(x, frozen, seed) -> x or (x, trajectory)`` captured once in a
    CUDA graph on static buffers. A call copies x, frozen and the seed (a device int64 that the
    Philox draws read at launch) into the buffers and replays the graph: one launch, no host
    sync, no allocation. The loop's host-side decisions (steps, offsets, the plan tables) are
    frozen at capture; they depend only on the options and the shape."""

    def __init__(self, body: Callable, x: torch.Tensor, frozen: torch.Tensor, warmup: int = 2):
        self.static_x = x.clone()
        self.static_frozen = frozen.clone()
        self.static_seed = torch.zeros((), dtype=torch.int64, device=x.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # lazy initialisation (kernel compiles, handles)
            for _ in range(warmup):
                body(self.static_x, self.static_frozen, self.static_seed)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = body(self.static_x, self.static_frozen, self.static_seed)

    def __call__(self, x: torch.Tensor, frozen: torch.Tensor, seed: int):
        self.static_x.copy_(x)
        self.static_frozen.copy_(frozen)
        self.static_seed.fill_(seed)
        self.graph.replay()
        if isinstance(self.static_out, tuple):  # (x, trajectory): copies outlive the next replay
            final, trajectory = self.static_out
            return final.clone(), [state.clone() for state in trajectory]
        return self.static_out.clone()


_GRAPHS: dict = {}


def clear_graph_cache() -> None:
    """Drop every sampler loop captured by ``cuda_graph=True`` (and the model references and
    graph memory they hold)."""
    _GRAPHS.clear()


def _replay(key: tuple, prepare: Callable, x: torch.Tensor, frozen: torch.Tensor, seed: int):
    """Run the loop cached under ``key`` through its CUDA graph. On the key's first use,
    ``prepare()`` validates the call with one eager run and returns the loop body to capture."""
    if key not in _GRAPHS:
        _GRAPHS[key] = _CapturedLoop(prepare(), x, frozen)
    return _GRAPHS[key](x, frozen, seed)


# ----------------------------------------------------------------------------- plans

class _MaskedOptions(NamedTuple):
    steps: int
    mask_id: int
    schedule: Schedule
    method: str
    tokens_per_step: Optional[int]
    confidence: str
    block_length: Optional[int]
    temperature: float
    final_denoise: bool


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


def _num_blocks(movable: torch.Tensor, block_length: Optional[int], steps: int) -> int:
    """Semi-autoregressive blocks: enough for the most masked row (one host read)."""
    if block_length is None:
        return 1
    most_masked = int(movable.sum(1).max())
    num_blocks = max(1, math.ceil(most_masked / block_length))
    if steps < num_blocks:
        raise ValueError(f"steps={steps} is fewer than the {num_blocks} blocks of "
                         f"block_length={block_length}; each block needs at least one step")
    return num_blocks


class _PlanTables(NamedTuple):
    """What a run needs besides x, frozen and the seed, computed on the host and copied to the
    device once (a CUDA-graph capture may not copy from the host)."""

    times: torch.Tensor  # (steps, B) float32 model times
    unmasked_by: Optional[torch.Tensor]  # exact/euler: (steps,) float64, P(unmasked by step k)
    num_blocks: int  # confidence: blocks, the block of each step (host and device), the step's
    block_of_step: List[int]  # index inside its block, and the schedule's fractions revealed
    block_of_step_device: Optional[torch.Tensor]  # after/before each step (None with
    local_step: Optional[torch.Tensor]  # tokens_per_step)
    frac_after: Optional[torch.Tensor]
    frac_before: Optional[torch.Tensor]


def _plan_tables(options: _MaskedOptions, num_blocks: int, batch: int, device) -> _PlanTables:
    steps = options.steps
    times = _time_table(steps, batch, device)
    if options.method != "confidence":
        jump = _jump_probs(options.schedule, steps, options.method)
        unmasked_by = 1 - torch.cumprod(1 - jump, dim=0)
        unmasked_by[-1] = 1.0
        return _PlanTables(times, unmasked_by.to(device), 1, [], None, None, None, None)
    block_steps = [steps // num_blocks + (j < steps % num_blocks) for j in range(num_blocks)]
    block_of_step = [j for j, n in enumerate(block_steps) for _ in range(n)]
    local_step = [i for n in block_steps for i in range(n)]
    frac_after = frac_before = None
    if options.tokens_per_step is None:
        after, before = [], []
        for n in block_steps:
            grid = torch.arange(n + 1, dtype=torch.float64) / n
            kappa = options.schedule.kappa(grid).to(torch.float64)
            frac = ((kappa - kappa[0]) / (1 - kappa[0])).clamp(0, 1)
            frac[-1] = 1.0
            after.append(frac[1:])
            before.append(frac[:-1])
        frac_after, frac_before = torch.cat(after).to(device), torch.cat(before).to(device)
    return _PlanTables(times, None, num_blocks, block_of_step,
                       torch.tensor(block_of_step, dtype=torch.int64, device=device),
                       torch.tensor(local_step, dtype=torch.int64, device=device),
                       frac_after, frac_before)


class _JumpPlan(NamedTuple):
    """method exact/euler: the step (0..steps-1) in which each position unmasks; ``steps`` for
    positions that never change (frozen or not masked)."""

    unmask_step: torch.Tensor  # (B, L) int64

    def changes(self, steps: int) -> torch.Tensor:
        counts = torch.bincount(self.unmask_step.flatten(), minlength=steps + 1)
        return counts[:steps] > 0


def _jump_plan(movable: torch.Tensor, tables: _PlanTables, steps: int, seed) -> _JumpPlan:
    """First-jump step of each movable position, P(step <= k) = 1 - prod_{j <= k}(1 - p_j)."""
    u, _ = philox.row_uniforms(seed, PLAN_OFFSET, movable.numel(), device=movable.device)
    step = torch.searchsorted(tables.unmasked_by, u, right=True).reshape(movable.shape)
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


def _count_plan(movable: torch.Tensor, tables: _PlanTables, tokens_per_step: Optional[int],
                block_length: Optional[int]) -> _CountPlan:
    """Blocks: block j of a sequence is its j-th run of ``block_length`` movable positions in
    position order (with a prompt prefix: LLaDA's blocks over the generated part); positions
    past the last block (possible only in a captured loop given more masks than at capture)
    never change. Steps are split evenly over the blocks. Within a block of S steps, the number
    revealed by local step i is ``tokens_per_step``, or round(m F_i) - round(m F_{i-1}) with F_i
    the schedule's fraction unmasked by then, (kappa((i+1)/S) - kappa(0)) / (1 - kappa(0)), so
    all m are revealed after S steps."""
    num_blocks = tables.num_blocks
    if block_length is None:
        block_id = torch.where(movable, 0, -1)
    else:
        rank = movable.long().cumsum(1) - 1
        block_id = torch.where(movable & (rank < num_blocks * block_length),
                               rank // block_length, -1)
    slot = torch.where(block_id >= 0, block_id, num_blocks)
    per_block = torch.zeros(movable.shape[0], num_blocks + 1, dtype=torch.int64,
                            device=movable.device)
    per_block.scatter_add_(1, slot, movable.long())
    masked = per_block[:, tables.block_of_step_device]  # (B, steps)
    local = tables.local_step
    if tokens_per_step is not None:
        done_after = torch.minimum(masked, tokens_per_step * (local + 1))
        done_before = torch.minimum(masked, tokens_per_step * local)
    else:
        m = masked.double()
        done_after = torch.floor(m * tables.frac_after + 0.5).long()
        done_before = torch.floor(m * tables.frac_before + 0.5).long()
    counts = (done_after - done_before).clamp(min=0)
    leftover = (per_block[:, :num_blocks].sum(1) > counts.sum(1)).any()
    return _CountPlan(block_id, tables.block_of_step, counts, leftover)


# ----------------------------------------------------------------------------- steps

def _confidence_scores(out, kind: str, seed, step: int) -> torch.Tensor:
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


def _masked_loop(model: Denoiser, x: torch.Tensor, frozen: torch.Tensor, seed,
                 options: _MaskedOptions, tables: _PlanTables, *, cache: bool, check: Optional[bool],
                 progress: bool = False, return_trajectory: bool = False):
    """The masked sampler on x (B, L) int64: plan, then the steps, then the final denoise.

    With ``cache`` the plan's skip list is read to the host (one sync, before the loop) and the
    steps that change nothing are skipped; without it every step runs and nothing here reads
    the device, so the loop can be captured in a CUDA graph (seed then a device int64).
    ``check``: the step op's checked mode (None: its default). Returns x or (x, trajectory)."""
    steps, mask_id = options.steps, options.mask_id
    movable = (x == mask_id) & ~frozen
    if options.method == "confidence":
        plan = _count_plan(movable, tables, options.tokens_per_step, options.block_length)
        leave_masks = options.final_denoise and options.tokens_per_step is not None
    else:
        plan = _jump_plan(movable, tables, steps, seed)
        leave_masks = False
    active = [True] * steps
    if cache:
        flags = plan.changes(steps)
        if leave_masks:
            flags = torch.cat([flags, plan.leftover[None]])
        flags = flags.tolist()  # the one read of the plan
        active = flags[:steps]
        leave_masks = leave_masks and flags[-1]

    step_op = _step_op()
    no_jump = torch.zeros((), dtype=torch.float32, device=x.device)
    validate = check is not False  # the first logits' shape and the ids, once
    trajectory = []
    for k in progress_steps(steps, progress):
        if active[k]:
            logits = model(x, tables.times[k])
            if validate:
                _check_logits(logits, x, mask_id + 1)
                validate = False
            if options.method == "confidence":
                out = step_op(logits, x, no_jump, mask_id=mask_id,
                              temperature=options.temperature, seed=seed, offset=k,
                              return_x1=True, return_confidence=True, check=check)
                eligible = (x == mask_id) & (plan.block_id == plan.block_of_step[k])
                take = top_per_row(_confidence_scores(out, options.confidence, seed, k), eligible,
                                   plan.counts[:, k])
                x = torch.where(take, out.x1, x)
            else:
                jump = (plan.unmask_step == k).float()
                x = step_op(logits, x, jump, mask_id=mask_id, temperature=options.temperature,
                            seed=seed, offset=k, check=check)
        if return_trajectory:
            trajectory.append(x)
    if leave_masks:
        logits = model(x, tables.times[-1])
        if validate:
            _check_logits(logits, x, mask_id + 1)
        x = torch.where(movable & (x == mask_id), _greedy_unmasked(logits, mask_id), x)
    return (x, trajectory) if return_trajectory else x


def _as_input_dtype(result, dtype: torch.dtype) -> SampleResult:
    if isinstance(result, tuple):
        x, trajectory = result
        return x.to(dtype), [state.to(dtype) for state in trajectory]
    return result.to(dtype)


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
    cuda_graph: on CUDA, the whole loop (plan, every model call and step, final denoise) is
    captured once per (model, shape, device, options) in a CUDA graph and replayed on later
    calls, with x_init, frozen and the seed copied into its static buffers: no host sync and no
    allocation per call. Same output as eager. Every step runs (a skip list would be a host
    read); the block count of ``block_length`` is the one of the first call's x_init, and later
    calls must not mask more positions per row (positions past the last block stay masked). The
    graph holds the model's parameters by address: update them in place;
    ``clear_graph_cache()`` frees the graphs. ValueError for non-CUDA tensors.

    Returns the final x (B, L) with the dtype of x_init, and with ``return_trajectory`` also the
    list of the ``steps`` states after each step (before the final denoise).
    """
    _check_model(model)
    x = _check_tokens(x_init)
    options = _MaskedOptions(
        steps=_positive_int("steps", steps), mask_id=_check_mask_id(mask_id),
        schedule=_resolve_schedule(schedule), method=_checks.choice("method", method, METHODS),
        tokens_per_step=_optional_positive_int("tokens_per_step", tokens_per_step),
        confidence=_checks.choice("confidence", confidence, CONFIDENCES),
        block_length=_optional_positive_int("block_length", block_length),
        temperature=_checks.positive_finite("temperature", temperature),
        final_denoise=bool(final_denoise))
    if method != "confidence" and (tokens_per_step is not None or block_length is not None):
        raise ValueError("tokens_per_step and block_length apply to method='confidence' only, "
                         f"got method={method!r}")
    frozen = _check_frozen(frozen, x)
    seed = _check_seed(seed)
    cuda_graph = _check_cuda_graph(cuda_graph, x)

    x = x.long()

    def plan_tables() -> _PlanTables:
        movable = (x == options.mask_id) & ~frozen
        num_blocks = _num_blocks(movable, options.block_length, options.steps)
        return _plan_tables(options, num_blocks, x.shape[0], x.device)

    if cuda_graph:
        def prepare():
            tables = plan_tables()
            _masked_loop(model, x, frozen, seed, options, tables, cache=True, check=None)

            def body(x, frozen, seed):
                return _masked_loop(model, x, frozen, seed, options, tables, cache=False,
                                    check=False, return_trajectory=return_trajectory)
            return body

        key = ("masked", model, options, tuple(x.shape), x.device, return_trajectory)
        return _as_input_dtype(_replay(key, prepare, x, frozen, seed), x_init.dtype)
    result = _masked_loop(model, x, frozen, seed, options, plan_tables(), cache=cache,
                          check=None, progress=progress, return_trajectory=return_trajectory)
    return _as_input_dtype(result, x_init.dtype)


def _uniform_loop(model: Denoiser, x: torch.Tensor, seed, times: torch.Tensor,
                  jumps: torch.Tensor, temperature: float, *, check: Optional[bool],
                  progress: bool = False, return_trajectory: bool = False):
    """Euler steps of the uniform sampler; nothing here reads the device (see _masked_loop)."""
    step_op = _step_op()
    trajectory = []
    for k in progress_steps(times.shape[0], progress):
        logits = model(x, times[k])
        if k == 0 and check is not False:
            _check_logits(logits, x, 1)
        x = step_op(logits, x, jumps[k], temperature=temperature, seed=seed, offset=k,
                    check=check)
        if return_trajectory:
            trajectory.append(x)
    return (x, trajectory) if return_trajectory else x


@torch.no_grad()
def sample_uniform(model: Denoiser, x_init: torch.Tensor, *, steps: int, schedule=None,
                   temperature: float = 1.0, seed: int = 0, progress: bool = False,
                   return_trajectory: bool = False, cuda_graph: bool = False) -> SampleResult:
    """Uniform-state discrete flow matching: Euler steps from t = 0 to 1.

    x_init (B, L) is the noise sample (e.g. uniform ids). In step k (t_k = k / steps) every
    position jumps with probability 1 - exp(-h dkappa/(1 - kappa)) to x1 ~ softmax(z / T) drawn
    from the model's logits (B, L, V); in the last step every position jumps. One step op per
    step, keyed by (seed, k). ``cuda_graph``: as in ``sample_masked``, the whole loop captured
    once per (model, shape, device, options) and replayed. Returns x (B, L) and, with
    ``return_trajectory``, the ``steps`` states after each step.
    """
    _check_model(model)
    x = _check_tokens(x_init)
    steps = _positive_int("steps", steps)
    temperature = _checks.positive_finite("temperature", temperature)
    seed = _check_seed(seed)
    schedule = _resolve_schedule(schedule)
    cuda_graph = _check_cuda_graph(cuda_graph, x)

    x = x.long()

    def step_tables() -> Tuple[torch.Tensor, torch.Tensor]:
        """(steps, B) model times and (steps,) jump probabilities on x's device."""
        jumps = _jump_probs(schedule, steps, "euler").to(device=x.device, dtype=torch.float32)
        return _time_table(steps, x.shape[0], x.device), jumps

    if cuda_graph:
        def prepare():
            times, jumps = step_tables()
            _uniform_loop(model, x, seed, times, jumps, temperature, check=None)

            def body(x, frozen, seed):
                return _uniform_loop(model, x, seed, times, jumps, temperature, check=False,
                                     return_trajectory=return_trajectory)
            return body

        key = ("uniform", model, steps, schedule, temperature, tuple(x.shape), x.device,
               return_trajectory)
        no_frozen = torch.zeros_like(x, dtype=torch.bool)
        return _as_input_dtype(_replay(key, prepare, x, no_frozen, seed), x_init.dtype)
    result = _uniform_loop(model, x, seed, *step_tables(), temperature, check=None,
                           progress=progress, return_trajectory=return_trajectory)
    return _as_input_dtype(result, x_init.dtype)
