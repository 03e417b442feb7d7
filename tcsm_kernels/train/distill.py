"""Distilling an autoregressive teacher into a masked-diffusion student (SPEC 4.4 and 6).

Each step draws the same global batch as pre-training (clean windows x, times t, masks), the
teacher reads the clean x once and yields top-K candidates with log concrete ratios at every
position (optionally with the Taylor future term), and the student's logits at the masked
positions of x_t are fitted to them (``topk_target.TopKTargetTrainer``: the fused top-K loss
under the pre-training loop's weighting, ``--time-weight``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import distributed
from .ar_teacher import ar_topk_targets, load_teacher, teacher_bits, train_teacher
from .files import write_json_atomic, write_text_atomic
from .progress import read_metrics
from .report import markdown_table, pyplot, save_figure
from .run import METRICS_FILE, ConfigError, TrainConfig
from .topk_target import TAILS, TopKTargetTrainer
from .trainer import Session, train, train_single_process

DISTILL_FILE = "distill.json"


@dataclass
class DistillOptions:
    teacher: str  # teacher run directory or checkpoint
    k: int = 8
    temperature: float = 1.0
    taylor: bool = False
    tail: str = "zero"

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0; got {self.temperature}")
        if self.tail not in TAILS:
            raise ConfigError(f"--tail must be one of {', '.join(TAILS)}; got {self.tail!r}")
        if self.k <= 0:
            raise ConfigError(f"--k must be > 0; got {self.k}")


class Distiller(TopKTargetTrainer):
    """The pre-training loop with the sparse AR-teacher target in place of the data target."""

    def __init__(self, config: TrainConfig, session: Session, run_dir: Path,
                 world: distributed.World, options: DistillOptions):
        super().__init__(config, session, run_dir, world)
        self.options, self.tail = options, options.tail
        self.teacher, teacher_config, teacher_corpus = load_teacher(options.teacher,
                                                                    world.device)
        if teacher_corpus.vocab != self.corpus.vocab:
            raise ConfigError(f"--teacher {options.teacher}: vocabulary "
                              f"({teacher_corpus.vocab.kind}, {teacher_corpus.vocab.size} "
                              f"symbols) differs from the student's ({self.corpus.vocab.kind}, "
                              f"{self.corpus.vocab.size} symbols)")
        if teacher_config.seq_len < config.seq_len:
            raise ConfigError(f"--seq-len {config.seq_len} exceeds the teacher's "
                              f"{teacher_config.seq_len}")
        if options.k > self.corpus.vocab.size:
            raise ConfigError(f"--k {options.k} exceeds the vocabulary size "
                              f"{self.corpus.vocab.size}")
        record = run_dir / DISTILL_FILE
        if not record.exists():
            write_json_atomic(record, asdict(options))

    def logits_and_targets(self, x_t: torch.Tensor, t: torch.Tensor, clean: torch.Tensor):
        options = self.options
        indices, log_ratios = ar_topk_targets(self.teacher, clean, options.k,
                                              options.temperature, options.taylor)
        return self.model(x_t, t), (indices, log_ratios)


def distill(config: Optional[TrainConfig], session: Session,
            options: Optional[DistillOptions]) -> dict:
    """`tcsm distill`: train (or resume) a student run in ``session.out``; the student run has
    the pre-training layout (``tcsm eval/sample/plot`` work on it) plus distill.json."""
    run_dir = Path(session.out)
    if session.resume is not None:
        options = DistillOptions(**json.loads((run_dir / DISTILL_FILE).read_text()))
    options.validate()
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


def compare_distill(out: str, *, config: TrainConfig, teacher_steps: int, k: int = 8,
                    temperature: float = 1.0, taylor: bool = False, threads: Optional[int] = None,
                    quiet: bool = True) -> str:
    """Train an AR teacher, then data-only pre-training and distillation with the same
    configuration (same batches, steps and evaluations); write ``comparison.md`` (validation
    bits per token at equal steps, and the data run at the distilled run's wall-clock, linearly
    interpolated) and ``comparison.png`` into ``out``. Returns the table."""
    out_dir = Path(out)
    teacher_config = replace(config, steps=teacher_steps,
                                         eval_every=teacher_steps)
    session = dict(threads=threads, quiet=quiet)
    train_teacher(teacher_config, Session(out=str(out_dir / "teacher"), **session))
    teacher, _, teacher_corpus = load_teacher(str(out_dir / "teacher"))
    teacher_val = teacher_bits(teacher, teacher_corpus.val, config.seq_len,
                               config.eval_sequences, torch.device("cpu"))
    train(config, Session(out=str(out_dir / "data"), **session))
    distill(config, Session(out=str(out_dir / "distill"), **session),
            DistillOptions(str(out_dir / "teacher"), k, temperature, taylor))
    data_curve = validation_curve(out_dir / "data")
    distill_curve = validation_curve(out_dir / "distill")
    data_seconds = [s for _, s, _ in data_curve]
    data_bits = [b for _, _, b in data_curve]
    rows = []
    for (step, d_s, d_bits), (_, s_s, s_bits) in zip(data_curve, distill_curve):
        at_clock = float(np.interp(s_s, data_seconds, data_bits))
        rows.append((step, f"{d_bits:.3f}", f"{s_bits:.3f}", f"{d_s:.1f}", f"{s_s:.1f}",
                     f"{at_clock:.3f}"))
    header = ["step", "data BPC", "distill BPC", "data s", "distill s",
              "data BPC at distill's s"]
    table = markdown_table(header, rows)
    table += (f"\nteacher: {teacher_steps} steps, exact validation BPC {teacher_val:.3f}; "
              f"K={k}, tau={temperature}, taylor={taylor}; BPC = validation NELBO bits per "
              f"token (upper bound)\n")
    write_text_atomic(out_dir / "comparison.md", table)
    _plot_comparison(data_curve, distill_curve, teacher_val, out_dir / "comparison.png")
    return table


def _plot_comparison(data_curve: list, distill_curve: list, teacher_val: float,
                     path: Path) -> None:
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for axis, column, label in ((axes[0], 0, "training step"), (axes[1], 1, "training seconds")):
        for curve, name in ((data_curve, "data-only pre-training"),
                            (distill_curve, "distillation (AR teacher)")):
            axis.plot([r[column] for r in curve], [r[2] for r in curve], "o-", label=name)
        axis.axhline(teacher_val, color="gray", linestyle=":", label="AR teacher (exact NLL)")
        axis.set(xlabel=label, ylabel="validation bits per token")
        axis.legend()
    fig.tight_layout()
    save_figure(fig, path)
