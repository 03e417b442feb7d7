"""`tcsm compare-distill`: data-only pre-training against distillation from an AR teacher,
matched and repeated.

Every arm trains the same student configuration on the same pool of training windows (the
cached targets' windows), with the same divergence (the run's, kl by default), loss scale,
batches, steps, evaluations and seeds; only the target differs:

  data         the clean token (cross-entropy)
  exact_dense  the teacher's full-context conditional over all V (docs/math.md 6)
  exact_topk   its K most probable entries, the rest as one cell (math.md 4.5)
  local        the teacher's left-context conditional alone
  taylor       local + the first-order future term

Wall-clock seconds of the exact arms include building the cached targets once (the amortised
figure, training alone, is reported beside it). Finished runs are kept and skipped when the
command is run again, so an interrupted comparison resumes.
"""
from __future__ import annotations

import shutil
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from .ar_teacher import load_teacher, teacher_bits, train_teacher
from .data import entropies
from .distill import DistillOptions, PoolTrainer, distill, validation_curve
from .files import write_json_atomic, write_text_atomic
from .progress import read_metrics
from .report import markdown_table, pyplot, save_figure
from .run import METRICS_FILE, TrainConfig
from .targets import distill_targets
from .trainer import Session, train_single_process

ARMS = ("data", "exact_dense", "exact_topk", "local", "taylor")
CACHED_ARMS = ("exact_dense", "exact_topk")


def _finished(run_dir: Path, steps: int) -> bool:
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        return False
    return any(r.get("step") == steps and "val_bits" in r for r in read_metrics(metrics))


def _train_arm(arm: str, run_dir: Path, config: TrainConfig, teacher: str, store: str, k: int,
               session: dict) -> None:
    if _finished(run_dir, config.steps):
        return
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts over
    run = Session(out=str(run_dir), **session)
    if arm == "data":
        train_single_process(PoolTrainer, config, run, targets=store)
        return
    target, arm_k = {"exact_dense": ("exact", 0), "exact_topk": ("exact", k),
                     "local": ("local", 0), "taylor": ("taylor", 0)}[arm]
    distill(config, run, DistillOptions(teacher, targets=store, target=target, k=arm_k))


def compare_distill(out: str, *, config: TrainConfig, teacher_steps: int,
                    teacher: Optional[str] = None, k: int = 8, windows: int = 1024,
                    seeds: Sequence[int] = (0, 1, 2), arms: Sequence[str] = ARMS,
                    threads: Optional[int] = None, quiet: bool = True,
                    json_path: Optional[str] = None) -> str:
    """Train (or reuse) the teacher, build (or reuse) its exact targets for ``windows``
    windows, train every arm for every seed, and write ``distill_comparison.json`` (or
    ``json_path``), ``comparison.md`` and ``comparison.png`` into ``out``. Returns the table."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    session = dict(threads=threads, quiet=quiet)
    if teacher is None:
        teacher = str(out_dir / "teacher")
        if not _finished(Path(teacher), teacher_steps):
            shutil.rmtree(teacher, ignore_errors=True)
            train_teacher(replace(config, steps=teacher_steps, eval_every=teacher_steps),
                          Session(out=teacher, **session))
    store, _ = distill_targets(teacher, str(out_dir / "targets"), windows=windows,
                               progress=not quiet)
    teacher_model, _, corpus = load_teacher(teacher)
    teacher_val = teacher_bits(teacher_model, corpus.val, config.seq_len,
                               config.eval_sequences, torch.device("cpu"))
    unigram, bigram = entropies(corpus.val, corpus.vocab.size)
    result = {"arms": {}, "teacher_bpc": teacher_val, "unigram": unigram, "bigram": bigram,
              "build_seconds": store.meta.build_seconds, "windows": windows, "k": k,
              "seeds": list(seeds), "steps": config.steps, "divergence": config.divergence}
    for arm in arms:
        runs = []
        for seed in seeds:
            run_dir = out_dir / f"{arm}-seed{seed}"
            _train_arm(arm, run_dir, replace(config, seed=seed), teacher, str(store.path), k,
                       session)
            curve = validation_curve(run_dir)
            build = store.meta.build_seconds if arm in CACHED_ARMS else 0.0
            runs.append({"steps": [c[0] for c in curve], "bpc": [c[2] for c in curve],
                         "seconds": [round(c[1] + build, 2) for c in curve],
                         "train_seconds": [round(c[1], 2) for c in curve]})
        result["arms"][arm] = {"seeds": runs}
    write_json_atomic(Path(json_path) if json_path else out_dir / "distill_comparison.json",
                      result)
    table = comparison_table(result)
    write_text_atomic(out_dir / "comparison.md", table)
    plot_comparison(result, out_dir / "comparison.png")
    return table


def _mean_spread(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def comparison_table(result: dict) -> str:
    """Validation BPC (mean ± sd over seeds) at each evaluated step, then wall-clock."""
    arms = list(result["arms"])
    steps = result["arms"][arms[0]]["seeds"][0]["steps"]
    rows = []
    for i, step in enumerate(steps):
        rows.append([step] + [_mean_spread([run["bpc"][i] for run in data["seeds"]])
                              for data in result["arms"].values()])
    seconds = [statistics.mean(run["seconds"][-1] for run in result["arms"][arm]["seeds"])
               for arm in arms]
    rows.append(["seconds"] + [f"{value:.0f}" for value in seconds])
    table = markdown_table(["step"] + arms, rows)
    table += (f"\nValidation NELBO bits per token, mean ± sd over seeds {result['seeds']}; "
              f"{result['windows']} pool windows, K={result['k']}, divergence "
              f"{result['divergence']}. Teacher {result['teacher_bpc']:.3f} bits (exact NLL); "
              f"unigram {result['unigram']:.3f}, bigram {result['bigram']:.3f}. 'seconds': "
              f"training time at the last step, plus {result['build_seconds']:.0f} s of target "
              "building for the exact arms (built once, reusable).\n")
    return table


def plot_comparison(result: dict, path: Path) -> None:
    """BPC against steps and against wall-clock seconds: each arm's mean over seeds, with the
    range of the seeds shaded."""
    fig, axes = pyplot().subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for axis, key, label in ((axes[0], "steps", "training step"),
                             (axes[1], "seconds", "seconds (exact arms: + target building)")):
        for arm, data in result["arms"].items():
            runs = data["seeds"]
            x = [statistics.mean(run[key][i] for run in runs) for i in range(len(runs[0][key]))]
            bpc = list(zip(*(run["bpc"] for run in runs)))
            line, = axis.plot(x, [statistics.mean(b) for b in bpc], "o-", ms=3, label=arm)
            axis.fill_between(x, [min(b) for b in bpc], [max(b) for b in bpc], alpha=0.15,
                              color=line.get_color())
            if key == "seconds" and arm in CACHED_ARMS:  # amortised: the targets already built
                cached = [statistics.mean(run["train_seconds"][i] for run in runs)
                          for i in range(len(x))]
                axis.plot(cached, [statistics.mean(b) for b in bpc], "--", ms=3,
                          color=line.get_color(), label=f"{arm} (targets cached)")
        for value, name, style in ((result["unigram"], "unigram", ":"),
                                   (result["bigram"], "bigram", "--")):
            axis.axhline(value, color="gray", linestyle=style, linewidth=1, label=name)
        axis.set(xlabel=label)
        axis.grid(alpha=0.3)
    axes[0].set(ylabel="validation bits per token (NELBO)")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"distillation vs data, {len(result['seeds'])} seeds, matched "
                 f"{result['divergence']} loss")
    fig.tight_layout()
    save_figure(fig, path)
