"""The skeleton every sampler shares.

- ``StepLoop``: the steps of one run on x: per step k one model call (``logits``) and one
  update of x (``update``), with ``start`` / ``finish`` hooks; ``run`` is the loop itself
  (skipped steps, progress bar, trajectory). The adapters' solvers subclass it directly.
- ``DenoiserLoop``: a StepLoop for this library's denoisers ``model(x_t, t) -> logits``.
- ``Sampler``: a sampler of this library's API, as validated hashable options (they key the
  CUDA-graph cache), the tables a call needs and the loop it runs.
- ``sample``: the public call every Sampler shares: argument checks, an eager or a captured
  run, the result cast to x_init's dtype.
"""
from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from typing import Callable, Iterator, List, Optional, Tuple, Union

import torch

from .. import _checks, philox
from . import graphs

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SampleResult = Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]


def progress_steps(total: int, enabled: bool, desc: str = "sampling") -> Iterator[int]:
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


class StepLoop(ABC):
    """The steps of one sampling run on x (B, ...) int64. Subclasses set ``steps`` and define
    ``logits`` and ``update``; ``run`` drives them."""

    steps: int
    progress_label = "sampling"

    def start(self, x: torch.Tensor) -> List[bool]:
        """Prepare the run from the initial x; returns which of the steps run (a skipped step
        calls neither the model nor ``update``). Default: every step."""
        return [True] * self.steps

    @abstractmethod
    def logits(self, model, x: torch.Tensor, k: int) -> torch.Tensor:
        """The model's output for x at step k, as logits (B, ..., V)."""

    @abstractmethod
    def update(self, k: int, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x after step k, from the step's logits."""

    def keeps(self, k: int) -> bool:
        """Whether the trajectory keeps the state after step k. Default: every state."""
        return True

    def finish(self, model, x: torch.Tensor) -> torch.Tensor:
        """x after the last step (e.g. a final denoise). Default: x."""
        return x

    def run(self, model, x: torch.Tensor, *, progress: bool = False,
            return_trajectory: bool = False) -> SampleResult:
        """The final x, and with ``return_trajectory`` the list of the kept states after each
        step (before ``finish``)."""
        active = self.start(x)
        trajectory = []
        for k in progress_steps(self.steps, progress, self.progress_label):
            if active[k]:
                x = self.update(k, self.logits(model, x, k), x)
            if return_trajectory and self.keeps(k):
                trajectory.append(x)
        x = self.finish(model, x)
        return (x, trajectory) if return_trajectory else x


class Sampler(ABC):
    """A sampler of this library's API. Subclasses are frozen dataclasses of validated options
    (equal options, one captured CUDA graph) with a ``validated(...)`` constructor."""

    min_vocab = 1  # the logits need at least this many columns

    @abstractmethod
    def tables(self, x: torch.Tensor, frozen: torch.Tensor):
        """What every run of a call needs besides x, frozen and the seed, computed on the host
        and copied to x's device once (a CUDA-graph capture may not copy from the host); a
        NamedTuple with ``times``, the (steps, B) float32 model times. May validate against
        x (B, L) int64 and frozen (B, L) bool."""

    @abstractmethod
    def loop(self, tables, frozen: torch.Tensor, seed: philox.Seed, *, cache: bool,
             check: Optional[bool]) -> "StepLoop":
        """The steps of one run. With ``cache`` the loop may read its plan to the host once and
        skip steps; without, nothing in it reads the device, so it can be captured in a CUDA
        graph (seed then a device int64). ``check``: the step op's checked mode (None: its
        default); False also skips the validation of the first logits."""


class DenoiserLoop(StepLoop):
    """A StepLoop of a ``Sampler``: the denoiser ``model(x_t (B, L) int64, t (B,) float32) ->
    logits (B, L, V)`` is called at the tables' model times; its first output is validated
    (V >= the sampler's ``min_vocab``, x's ids below V) unless ``check`` is False."""

    def __init__(self, sampler: Sampler, tables, frozen: torch.Tensor, seed: philox.Seed, *,
                 cache: bool, check: Optional[bool]):
        self.sampler, self.tables, self.frozen, self.seed = sampler, tables, frozen, seed
        self.cache, self.check = cache, check
        self.steps = tables.times.shape[0]
        self._validate = check is not False

    def logits(self, model: Denoiser, x: torch.Tensor, k: int) -> torch.Tensor:
        logits = model(x, self.tables.times[k])
        if self._validate:
            _checks.denoiser_logits(logits, x, self.sampler.min_vocab)
            self._validate = False
        return logits


def _as_dtype(result: SampleResult, dtype: torch.dtype) -> SampleResult:
    if isinstance(result, tuple):
        x, trajectory = result
        return x.to(dtype), [state.to(dtype) for state in trajectory]
    return result.to(dtype)


@torch.no_grad()
def sample(sampler: Sampler, model: Denoiser, x_init: torch.Tensor, *,
           frozen: Optional[torch.Tensor] = None, seed: int = 0, cache: bool = True,
           progress: bool = False, return_trajectory: bool = False,
           cuda_graph: bool = False) -> SampleResult:
    """Run ``sampler`` on the denoiser from x_init (B, L); positions where ``frozen`` (B, L) is
    true never change (None: none frozen). Eager, or with ``cuda_graph`` through the loop
    captured once per (sampler, model, shape, device, return_trajectory): x_init, frozen and
    the seed are copied into its static buffers, every step runs, ``progress`` is not shown.
    Returns x (B, L) with x_init's dtype, and with ``return_trajectory`` the states after each
    step."""
    _checks.callable_as("model", model, "model(x_t, t)")
    x = _checks.token_matrix("x_init", x_init, empty_ok=False)
    frozen = _checks.bool_like("frozen", frozen, x, "x_init")
    seed = _checks.philox_int("seed", seed)
    cuda_graph = _checks.cuda_graph_flag(cuda_graph, x)

    x = x.long()
    if cuda_graph:
        def prepare() -> graphs.LoopBody:
            tables = sampler.tables(x, frozen)
            sampler.loop(tables, frozen, seed, cache=True, check=None).run(model, x)

            def body(x, frozen, seed):
                return sampler.loop(tables, frozen, seed, cache=False, check=False).run(
                    model, x, return_trajectory=return_trajectory)
            return body

        key = (sampler, model, tuple(x.shape), x.device, return_trajectory)
        return _as_dtype(graphs.replay(key, prepare, x, frozen, seed), x_init.dtype)
    loop = sampler.loop(sampler.tables(x, frozen), frozen, seed, cache=cache, check=None)
    result = loop.run(model, x, progress=progress, return_trajectory=return_trajectory)
    return _as_dtype(result, x_init.dtype)
