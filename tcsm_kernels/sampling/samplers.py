"""The samplers: masked (exact / Euler / confidence-ordered) and uniform.

Each sampler is a ``skeleton.Sampler`` (validated options, the tables of a call, its loop), a
``skeleton.DenoiserLoop`` (what a step does) and a public function that hands both to
``skeleton.sample`` (argument checks, eager or CUDA-graph run, dtype cast). A new sampler is
those three pieces here, its name in ``__all__``, and its tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Union

import torch

from .. import _checks, philox
from ..ops.ctmc_step import StepOutput, ctmc_step
from ..schedules import Schedule
from . import plans
from .skeleton import Denoiser, DenoiserLoop, Sampler, SampleResult, sample

__all__ = ["sample_masked", "sample_uniform", "METHODS", "CONFIDENCES"]

METHODS = ("exact", "euler", "confidence")
CONFIDENCES = ("low_confidence", "margin", "entropy", "random")
RANDOM_KEY_OFFSET = 2**62  # + step index: Philox offset of the keys of confidence="random"


# ----------------------------------------------------------------------------- masked

class MaskedTables(NamedTuple):
    times: torch.Tensor  # (steps, B) float32 model times
    unmasking: Union[plans.JumpTable, plans.CountTable]  # by method: exact/euler, confidence


@dataclass(frozen=True)
class MaskedSampler(Sampler):
    """The options of ``sample_masked`` (see there)."""

    steps: int
    mask_id: int
    schedule: Schedule
    method: str
    tokens_per_step: Optional[int]
    confidence: str
    block_length: Optional[int]
    temperature: float
    final_denoise: bool

    @classmethod
    def validated(cls, *, steps: int, mask_id: int, schedule=None, method: str = "exact",
                  tokens_per_step: Optional[int] = None, confidence: str = "low_confidence",
                  block_length: Optional[int] = None, temperature: float = 1.0,
                  final_denoise: bool = True) -> "MaskedSampler":
        method = _checks.choice("method", method, METHODS)
        if method != "confidence" and (tokens_per_step is not None or block_length is not None):
            raise ValueError("tokens_per_step and block_length apply to method='confidence' "
                             f"only, got method={method!r}")
        return cls(
            steps=_checks.integer("steps", steps, 1),
            mask_id=_checks.integer("mask_id", mask_id, 0),
            schedule=_checks.schedule(schedule), method=method,
            tokens_per_step=None if tokens_per_step is None else _checks.integer(
                "tokens_per_step", tokens_per_step, 1),
            confidence=_checks.choice("confidence", confidence, CONFIDENCES),
            block_length=None if block_length is None else _checks.integer(
                "block_length", block_length, 1),
            temperature=_checks.positive_finite("temperature", temperature),
            final_denoise=bool(final_denoise))

    @property
    def min_vocab(self) -> int:
        return self.mask_id + 1

    def tables(self, x: torch.Tensor, frozen: torch.Tensor) -> MaskedTables:
        times = plans.model_times(self.steps, x.shape[0], x.device)
        if self.method != "confidence":
            return MaskedTables(times, plans.JumpTable.build(self.schedule, self.steps,
                                                             self.method, x.device))
        blocks = plans.num_blocks((x == self.mask_id) & ~frozen, self.block_length, self.steps)
        return MaskedTables(times, plans.CountTable.build(
            self.schedule, self.steps, blocks, self.tokens_per_step, self.block_length, x.device))

    def loop(self, tables: MaskedTables, frozen: torch.Tensor, seed: philox.Seed, *,
             cache: bool, check: Optional[bool]) -> DenoiserLoop:
        kind = ConfidenceLoop if self.method == "confidence" else JumpLoop
        return kind(self, tables, frozen, seed, cache=cache, check=check)


class JumpLoop(DenoiserLoop):
    """Methods exact/euler: step k moves the positions the plan unmasks in step k to x1."""

    sampler: MaskedSampler

    def start(self, x: torch.Tensor) -> List[bool]:
        movable = (x == self.sampler.mask_id) & ~self.frozen
        self.plan = self.tables.unmasking.plan(movable, self.seed)
        if not self.cache:
            return [True] * self.steps
        return self.plan.changes(self.steps).tolist()  # the one read of the plan

    def update(self, k: int, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        jump = (self.plan.unmask_step == k).float()
        return ctmc_step(logits, x, jump, mask_id=self.sampler.mask_id,
                         temperature=self.sampler.temperature, seed=self.seed, offset=k,
                         check=self.check)


def confidence_scores(out: StepOutput, kind: str, seed: philox.Seed, step: int) -> torch.Tensor:
    """(B, L) score of a step's draws, higher = unmask first."""
    if kind == "low_confidence":
        return out.prob
    if kind == "margin":
        return out.margin
    if kind == "entropy":
        return -out.entropy
    keys, _ = philox.row_uniforms(seed, RANDOM_KEY_OFFSET + step, out.x.numel(),
                                  device=out.x.device)
    return keys.reshape(out.x.shape)


def greedy_unmasked(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(B, L) argmax of the logits (B, L, V) with the mask column excluded."""
    scores = logits.float().clone()
    scores[..., mask_id] = float("-inf")
    return scores.argmax(dim=-1)


class ConfidenceLoop(DenoiserLoop):
    """Method confidence: step k draws x1 everywhere and reveals, per sequence, the plan's count
    of the most confident masked positions of the step's block; then the final denoise."""

    sampler: MaskedSampler

    def start(self, x: torch.Tensor) -> List[bool]:
        options = self.sampler
        self.movable = (x == options.mask_id) & ~self.frozen
        self.plan = self.tables.unmasking.plan(self.movable)
        self.no_jump = torch.zeros((), dtype=torch.float32, device=x.device)
        # tokens_per_step may leave masks after the last step: the final denoise fills them
        self.leave_masks = options.final_denoise and options.tokens_per_step is not None
        if not self.cache:
            return [True] * self.steps
        flags = self.plan.changes(self.steps)
        if self.leave_masks:
            flags = torch.cat([flags, self.plan.leftover[None]])
        flags = flags.tolist()  # the one read of the plan
        self.leave_masks = self.leave_masks and flags[-1]
        return flags[:self.steps]

    def update(self, k: int, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        options, plan = self.sampler, self.plan
        out = ctmc_step(logits, x, self.no_jump, mask_id=options.mask_id,
                        temperature=options.temperature, seed=self.seed, offset=k,
                        return_x1=True, return_confidence=True, check=self.check)
        eligible = (x == options.mask_id) & (plan.block_id == plan.block_of_step[k])
        take = plans.top_per_row(confidence_scores(out, options.confidence, self.seed, k),
                                 eligible, plan.counts[:, k])
        return torch.where(take, out.x1, x)

    def finish(self, model: Denoiser, x: torch.Tensor) -> torch.Tensor:
        """Leftover masks get the argmax of one more model call at the last grid time."""
        if not self.leave_masks:
            return x
        logits = self.logits(model, x, self.steps - 1)
        mask_id = self.sampler.mask_id
        return torch.where(self.movable & (x == mask_id), greedy_unmasked(logits, mask_id), x)


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

    cache: skip the steps that change no token (see the package docstring); identical output,
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
    sampler = MaskedSampler.validated(
        steps=steps, mask_id=mask_id, schedule=schedule, method=method,
        tokens_per_step=tokens_per_step, confidence=confidence, block_length=block_length,
        temperature=temperature, final_denoise=final_denoise)
    return sample(sampler, model, x_init, frozen=frozen, seed=seed, cache=cache,
                  progress=progress, return_trajectory=return_trajectory, cuda_graph=cuda_graph)


# ----------------------------------------------------------------------------- uniform

class UniformTables(NamedTuple):
    times: torch.Tensor  # (steps, B) float32 model times
    jumps: torch.Tensor  # (steps,) float32 Euler jump probabilities


@dataclass(frozen=True)
class UniformSampler(Sampler):
    """The options of ``sample_uniform`` (see there)."""

    steps: int
    schedule: Schedule
    temperature: float

    @classmethod
    def validated(cls, *, steps: int, schedule=None, temperature: float = 1.0
                  ) -> "UniformSampler":
        return cls(steps=_checks.integer("steps", steps, 1), schedule=_checks.schedule(schedule),
                   temperature=_checks.positive_finite("temperature", temperature))

    def tables(self, x: torch.Tensor, frozen: torch.Tensor) -> UniformTables:
        jumps = plans.jump_probs(self.schedule, self.steps, "euler")
        return UniformTables(plans.model_times(self.steps, x.shape[0], x.device),
                             jumps.to(device=x.device, dtype=torch.float32))

    def loop(self, tables: UniformTables, frozen: torch.Tensor, seed: philox.Seed, *,
             cache: bool, check: Optional[bool]) -> DenoiserLoop:
        return UniformLoop(self, tables, frozen, seed, cache=cache, check=check)


class UniformLoop(DenoiserLoop):
    """Step k: every position jumps to x1 with the step's Euler probability (frozen unused:
    ``sample_uniform`` has none)."""

    sampler: UniformSampler

    def update(self, k: int, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return ctmc_step(logits, x, self.tables.jumps[k], temperature=self.sampler.temperature,
                         seed=self.seed, offset=k, check=self.check)


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
    sampler = UniformSampler.validated(steps=steps, schedule=schedule, temperature=temperature)
    return sample(sampler, model, x_init, seed=seed, progress=progress,
                  return_trajectory=return_trajectory, cuda_graph=cuda_graph)
