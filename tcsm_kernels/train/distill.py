"""Distilling an autoregressive teacher into a masked-diffusion student (docs/math.md 4.5, 6).

Each step draws a pre-training batch (clean windows x, times t, masks) and the student's logits
at the masked positions of x_t are fitted to the teacher's target at x (``TeacherTargetTrainer``:
the fused loss under the pre-training loop's weighting, ``--time-weight``). Targets:

  exact   the full-context conditional p(y | x^{\\i}), computed once per window and cached by
          `tcsm distill-targets` (train/targets.py); batches then come from the store's windows
  local   the teacher's left-context conditional p(y | x_<i) alone (worse than data:
          docs/distill_comparison.md)
  taylor  local + the first-order future term (a diagnostic: it carries almost no signal)

with the distribution objective by default (top-K log-probabilities, or all V with --k 0); the
score objective (log-ratios against the data token, --objective score) stays available for
local/taylor and is biased (math.md 4.3).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from . import distributed
from ..ops.topk_scores import topk_log_probs
from .ar_teacher import ar_topk_targets, load_teacher
from .files import write_json_atomic
from .progress import read_metrics
from .run import METRICS_FILE, ConfigError, TrainConfig, read_config
from .targets import TargetError, TargetStore, taylor_future_terms
from .topk_target import OBJECTIVES, TeacherTargetTrainer, check_target_options, with_mask_column
from .trainer import Session, Trainer, train_single_process

DISTILL_FILE = "distill.json"
TARGET_KINDS = ("exact", "local", "taylor")


@dataclass
class DistillOptions:
    teacher: str  # teacher run directory or checkpoint
    targets: Optional[str] = None  # a `tcsm distill-targets` store (exact target, window pool)
    target: str = "exact"
    k: int = 8  # top-K entries; 0: the whole distribution
    temperature: float = 1.0
    objective: str = "distrib"
    tail: str = "zero"

    def validate(self, divergence: str) -> None:
        if self.target not in TARGET_KINDS:
            raise ConfigError(f"--target must be one of {', '.join(TARGET_KINDS)}; got "
                              f"{self.target!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be > 0; got {self.temperature}")
        if self.k < 0:
            raise ConfigError(f"--k must be >= 0 (0: all symbols); got {self.k}")
        if self.target == "exact":
            if self.targets is None:
                raise ConfigError("--target exact needs --targets STORE (build one with "
                                  "`tcsm distill-targets --teacher RUN --out STORE`)")
            if self.objective != "distrib" or self.temperature != 1.0:
                raise ConfigError("the exact target is a distribution: --objective distrib and "
                                  "--temperature 1 (build the store at another temperature)")
        if self.objective == "score" and self.k == 0:
            raise ConfigError("--objective score takes top-K log-ratios: --k > 0")
        dense = self.objective == "distrib" and self.k == 0 and self.target != "exact"
        check_target_options(divergence, self.objective, self.tail, "dense" if dense else "topk")


def open_store(path: str, config: TrainConfig, corpus, k: int, teacher: Optional[str]):
    """The store at ``path``, checked against the run (ConfigError naming --targets)."""
    try:
        store = TargetStore(Path(path))
        store.check_for(vocab_size=corpus.vocab.size, seq_len=config.seq_len, k=max(k, 1),
                        split_tokens=len(corpus.train), teacher=teacher)
    except TargetError as err:
        raise ConfigError(str(err)) from None
    return store


class Distiller(TeacherTargetTrainer):
    """The pre-training loop with the AR teacher's target in place of the data target."""

    def __init__(self, config: TrainConfig, session: Session, run_dir: Path,
                 world: distributed.World, options: DistillOptions):
        self.options, self.objective, self.tail = options, options.objective, options.tail
        self.target = f"AR teacher, {options.target} target"
        super().__init__(config, session, run_dir, world)
        self.teacher, teacher_config, teacher_corpus = load_teacher(options.teacher,
                                                                    world.device)
        vocab = self.corpus.vocab
        if teacher_corpus.vocab != vocab:
            raise ConfigError(f"--teacher {options.teacher}: vocabulary "
                              f"({teacher_corpus.vocab.kind}, {teacher_corpus.vocab.size} "
                              f"symbols) differs from the student's ({vocab.kind}, "
                              f"{vocab.size} symbols)")
        if teacher_config.seq_len < config.seq_len:
            raise ConfigError(f"--seq-len {config.seq_len} exceeds the teacher's "
                              f"{teacher_config.seq_len}")
        if options.k > vocab.size:
            raise ConfigError(f"--k {options.k} exceeds the vocabulary size {vocab.size}")
        self.store = None
        if options.targets is not None:
            self.store = open_store(options.targets, config, self.corpus, options.k,
                                    options.teacher)
            self.pool = self.store.starts
        record = run_dir / DISTILL_FILE
        if not record.exists():
            write_json_atomic(record, asdict(options))

    def teacher_log_probs(self, clean: torch.Tensor) -> torch.Tensor:
        """(B, L, V) log q of the local or Taylor target at temperature tau."""
        with torch.no_grad():
            scores = self.teacher.log_probs(clean)
        if self.options.target == "taylor":
            scores = scores + taylor_future_terms(self.teacher, clean)
        return torch.log_softmax(scores / self.options.temperature, -1)

    def logits_and_target(self, batch, x_t, t, clean):
        options, logits = self.options, self.model(x_t, t)
        if options.target == "exact":
            k = options.k or self.store.meta.k
            return logits, {"teacher_topk": self.store.batch(batch.pool_rows.numpy(), k,
                                                             x_t.device)}
        if options.objective == "score":
            return logits, {"teacher_topk": ar_topk_targets(
                self.teacher, clean, options.k, options.temperature,
                options.target == "taylor")}
        log_q = self.teacher_log_probs(clean)
        if options.k == 0:
            return logits, {"teacher_logits": with_mask_column(log_q, self.mask_id)}
        return logits, {"teacher_topk": tuple(topk_log_probs(log_q, options.k))}


class PoolTrainer(Trainer):
    """Data-only pre-training on a store's window pool: the matched baseline of distillation
    from cached targets (the same windows, batches, steps and loss)."""

    def __init__(self, config: TrainConfig, session: Session, run_dir: Path,
                 world: distributed.World, targets: str):
        super().__init__(config, session, run_dir, world)
        self.pool = open_store(targets, config, self.corpus, 1, None).starts


def distill(config: Optional[TrainConfig], session: Session,
            options: Optional[DistillOptions]) -> dict:
    """`tcsm distill`: train (or resume) a student run in ``session.out``; the student run has
    the pre-training layout (``tcsm eval/sample/plot`` work on it) plus distill.json."""
    run_dir = Path(session.out)
    if session.resume is not None:
        options = DistillOptions(**json.loads((run_dir / DISTILL_FILE).read_text()))
        config = None
    options.validate((config or read_config(run_dir)).divergence)
    _, teacher_config, _ = load_teacher(options.teacher)  # fail before creating the run
    if config is not None and teacher_config.vocab != config.vocab:
        raise ConfigError(f"--vocab {config.vocab} differs from the teacher's vocabulary "
                          f"{teacher_config.vocab} (--teacher {options.teacher})")
    return train_single_process(Distiller, config, session, options=options)


def validation_curve(run_dir: Path) -> list:
    """(step, elapsed training seconds, validation bits per token) of a run's evaluations."""
    records = read_metrics(Path(run_dir) / METRICS_FILE)
    elapsed = {r["step"]: r["elapsed_s"] for r in records if "elapsed_s" in r}
    return [(r["step"], elapsed[r["step"]], r["val_bits"]) for r in records if "val_bits" in r]
