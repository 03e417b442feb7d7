"""A run directory: its configuration, corpus and model.

Layout: ``config.json`` (the ``TrainConfig``), ``tokens.bin`` + ``vocab.json`` (the corpus),
``metrics.jsonl`` (one record per line) and ``checkpoints/last.pt`` + ``previous.pt``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .._checks import DIVERGENCES
from ..processes import MaskedProcess, UniformProcess
from ..schedules import SCHEDULES, get_schedule
from . import checkpoint
from .data import VOCABULARIES, TokenCorpus
from .files import write_json_atomic
from .model import Denoiser, DenoiserConfig

PROCESSES = ("masked", "uniform")
TIME_WEIGHTS = ("elbo", "none")
DTYPES = ("auto", "float32", "bfloat16")
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
LOSS_FILE = "loss.json"  # what the logged training loss is (LossInfo)
ESTIMATED_DIVERGENCES = ("is", "gkl")  # data target: Monte-Carlo estimates, constant dropped


class ConfigError(ValueError):
    """An option value that cannot work; raised before anything is written."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as config.json; fixed for its lifetime).

    The defaults are the demo's: tuned to learn fast in minutes on a 2-core CPU.
    """

    data: Optional[str] = None  # None: the embedded corpus (pydoc topics)
    vocab: str = "text8"
    val_fraction: float = 0.1
    process: str = "masked"
    schedule: str = "linear"
    divergence: str = "kl"
    time_weight: str = "none"  # none: mean over loss positions; elbo: w(t) per position / all
    seq_len: int = 32
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    time_conditioning: Optional[bool] = None  # None: on for the uniform process only
    batch_size: int = 64  # global, over all ranks and accumulation steps
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 4e-3
    warmup: int = 30
    min_lr_ratio: float = 0.1
    # Where the cosine decay ends (None: at ``steps``). Set when a run is extended (--resume
    # with more --steps) to the horizon it was planned with: the extra steps train at the final
    # learning rate and the steps already planned keep their learning rates.
    decay_steps: Optional[int] = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "auto"
    eval_every: int = 250
    eval_sequences: int = 256
    eval_times: int = 4
    ckpt_every: int = 500
    # The loss straight from the hidden states and the tied head (fused_linear_tcsm_loss): the
    # (N, V) logits and their gradient are never materialised.
    fused_head: bool = True
    # The LM head split over the vocabulary across all ranks (tensor parallel, on the hidden
    # states of --fused-head): every rank reads the whole batch; with one process it is simply
    # the full head.
    vocab_parallel: bool = False

    def validate(self, world_size: int = 1, new_run: bool = True) -> None:
        """ConfigError naming the first bad option (a new run also needs its data file)."""
        choices = {"vocab": VOCABULARIES, "process": PROCESSES, "schedule": tuple(SCHEDULES),
                   "divergence": DIVERGENCES, "time_weight": TIME_WEIGHTS, "dtype": DTYPES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name.replace('_', '-')} must be one of "
                                  f"{', '.join(allowed)}; got {getattr(self, name)!r}")
        for name in ("seq_len", "d_model", "n_layers", "n_heads", "batch_size", "grad_accum",
                     "steps", "eval_sequences", "eval_times"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0; got "
                                  f"{getattr(self, name)}")
        for name in ("warmup", "eval_every", "ckpt_every", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0; got "
                                  f"{getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must lie in (0, 1); got {self.val_fraction}")
        if not (self.lr > 0 and self.grad_clip >= 0 and self.weight_decay >= 0
                and 0 <= self.min_lr_ratio <= 1):
            raise ConfigError("need --lr > 0, --grad-clip >= 0, --weight-decay >= 0 and "
                              "--min-lr-ratio in [0, 1]")
        if self.decay_steps is not None and not 0 < self.decay_steps <= self.steps:
            raise ConfigError(f"decay_steps must lie in [1, steps={self.steps}]; got "
                              f"{self.decay_steps}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"--d-model {self.d_model} must be divisible by --n-heads "
                              f"{self.n_heads}")
        if new_run and self.data is not None and not Path(self.data).is_file():
            raise ConfigError(f"--data {self.data!r}: no such file")
        if self.vocab_parallel and not self.fused_head:
            raise ConfigError("--vocab-parallel needs --fused-head: the split head takes the "
                              "hidden states, not the logits")
        divisor, name = ((self.grad_accum, "--grad-accum") if self.vocab_parallel  # whole batch
                         else (world_size * self.grad_accum, "world size x --grad-accum"))
        if self.batch_size % divisor:
            raise ConfigError(f"--batch-size {self.batch_size} must be divisible by {name} = "
                              f"{divisor}")

    @property
    def masked(self) -> bool:
        return self.process == "masked"

    @property
    def lr_decay_steps(self) -> int:
        """The step where the cosine decay reaches ``min_lr_ratio``."""
        return self.steps if self.decay_steps is None else self.decay_steps

    @property
    def weighting(self) -> str:
        """How the per-position losses of a step are combined, in words."""
        positions = "masked positions" if self.masked else "positions"
        if self.time_weight == "elbo":
            return f"ELBO weight w(t) on the {positions}, / all positions"
        return f"mean over the {positions}"

    @property
    def time_conditioned(self) -> bool:
        if self.time_conditioning is None:
            return self.process == "uniform"
        return self.time_conditioning


def save_config(run_dir: Path, config: TrainConfig) -> None:
    write_json_atomic(Path(run_dir) / CONFIG_FILE, dataclasses.asdict(config))


def read_config(run_dir: Path) -> TrainConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} holds no training run (no {CONFIG_FILE})")
    return TrainConfig(**json.loads(path.read_text()))


@dataclass(frozen=True)
class LossInfo:
    """What a run's logged training loss is: its target, divergence and weighting, and whether
    it is a Monte-Carlo estimate with a constant dropped (then it can be negative)."""

    target: str  # "data", or the teacher whose scores are fitted
    divergence: str
    weighting: str
    estimate: bool

    @classmethod
    def data_target(cls, config: "TrainConfig") -> "LossInfo":
        return cls("data", config.divergence, config.weighting,
                   config.divergence in ESTIMATED_DIVERGENCES)

    @property
    def label(self) -> str:
        return "loss estimate (constant dropped)" if self.estimate else "loss"


def save_loss_info(run_dir: Path, info: LossInfo) -> None:
    write_json_atomic(Path(run_dir) / LOSS_FILE, dataclasses.asdict(info))


def read_loss_info(run_dir: Path, config: TrainConfig) -> LossInfo:
    """The run's LossInfo; a run without the file is a data-target run."""
    path = Path(run_dir) / LOSS_FILE
    if path.is_file():
        return LossInfo(**json.loads(path.read_text()))
    return LossInfo.data_target(config)


def mask_token(config: TrainConfig, corpus: TokenCorpus) -> Optional[int]:
    """The mask token's id (one past the data symbols) for the masked process, else None."""
    return corpus.vocab.size if config.masked else None


def make_process(config: TrainConfig, corpus: TokenCorpus):
    schedule = get_schedule(config.schedule)
    if config.masked:
        return MaskedProcess(schedule, corpus.vocab.size + 1, mask_token(config, corpus))
    return UniformProcess(schedule, corpus.vocab.size)


def build_model(config: TrainConfig, corpus: TokenCorpus) -> Denoiser:
    vocab_size = corpus.vocab.size + (1 if config.masked else 0)
    return Denoiser(DenoiserConfig(vocab_size, config.seq_len, config.d_model, config.n_layers,
                                   config.n_heads, time_conditioning=config.time_conditioned))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available")
    return device


def autocast_dtype(config: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """bfloat16 autocast on GPU by default; float32 (no autocast) on CPU unless asked."""
    if config.dtype == "bfloat16" or (config.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@dataclass
class TrainedRun:
    config: TrainConfig
    corpus: TokenCorpus
    model: Denoiser
    step: int
    device: torch.device


def load_trained(run_dir: Path, checkpoint_path: Optional[str] = None,
                 device: str = "auto") -> TrainedRun:
    """The model of a run from its last checkpoint (or ``checkpoint_path``), in eval mode."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    corpus = TokenCorpus(run_dir, config.val_fraction)
    target = resolve_device(device)
    path = Path(checkpoint_path) if checkpoint_path else run_dir / CHECKPOINT_DIR / checkpoint.LAST
    state = checkpoint.load(path)
    model = build_model(config, corpus)
    model.load_state_dict(state["model"])
    return TrainedRun(config, corpus, model.to(target).eval(), state["step"], target)
