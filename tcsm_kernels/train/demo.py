"""`tcsm demo`: train a small masked diffusion LM on the embedded corpus for a few minutes on
CPU, evaluate it against the corpus's n-gram entropies, sample from it, and compare the fused
loss with the reference."""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Optional

from .evaluate import evaluate_run, format_evaluation
from .loss_speed import format_table, loss_table
from .progress import read_metrics
from .run import METRICS_FILE, TrainConfig, load_trained
from .sample import generate
from .trainer import Session, train

DEMO_CONFIG = TrainConfig(eval_every=0)  # the defaults, evaluated once at the end
CALIBRATION_WARMUP, CALIBRATION_STEPS = 2, 8  # untimed first steps, then timed ones
TIME_LIMIT_FACTOR = 1.2  # a machine that slows down mid-run stops at this x the planned time


def calibrate(config: TrainConfig, run_dir: Path, threads: Optional[int]) -> float:
    """Seconds per training step on this machine, from a few steps of a throwaway run (the
    first ones, which pay one-time costs, are not timed)."""
    train(dataclasses.replace(config, steps=CALIBRATION_WARMUP + CALIBRATION_STEPS),
          Session(out=str(run_dir), threads=threads, quiet=True))
    elapsed = [r["elapsed_s"] for r in read_metrics(run_dir / METRICS_FILE)]
    return (elapsed[-1] - elapsed[CALIBRATION_WARMUP - 1]) / CALIBRATION_STEPS


def run_demo(out: Optional[str] = None, train_seconds: float = 140.0, bench: bool = True,
             threads: Optional[int] = None) -> dict:
    """The whole tour; returns the numbers it printed. The trained run is kept, in ``out`` or
    in a new ``runs/demo-<time>``, for ``tcsm sample`` / ``tcsm plot`` / ``tcsm eval``; only
    the throughput calibration's scratch run is removed."""
    began = time.perf_counter()
    workdir = Path(out) if out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    try:
        config = DEMO_CONFIG
        tokens_per_step = config.batch_size * config.seq_len
        print(f"tcsm demo: masked diffusion on the embedded corpus (pydoc topics, text8 cleaning); "
              f"{config.n_layers} layers, d={config.d_model}, length {config.seq_len}, "
              f"batch {config.batch_size}", flush=True)
        seconds_per_step = calibrate(config, workdir / "calibration", threads)
        steps = max(int(train_seconds / seconds_per_step), 50)
        print(f"throughput {tokens_per_step / seconds_per_step / 1e3:.1f}k tokens/s -> {steps} "
              f"steps (about {train_seconds:.0f} s)", flush=True)
        run_dir = workdir / "run"
        summary = train(dataclasses.replace(config, steps=steps),
                        Session(out=str(run_dir), threads=threads,
                                time_limit=TIME_LIMIT_FACTOR * train_seconds))
        note = " (the time limit stopped it early)" if summary["stopped_early"] else ""
        print(f"trained {summary['step']} steps{note} in {summary['elapsed_s']:.0f} s "
              f"({summary['tokens_per_s'] / 1e3:.1f}k tokens/s), final training loss "
              f"{summary['loss']:.3f}", flush=True)
        trained = load_trained(run_dir)
        evaluation = evaluate_run(trained, time_samples=8)
        print(format_evaluation(evaluation), flush=True)
        samples = generate(trained, method="exact", steps=config.seq_len, num=4, seed=0)
        print(f"samples (exact sampler, {config.seq_len} steps):")
        for text in samples:
            print(f"  |{text}|")
        table = loss_table() if bench else []
        if table:
            print(format_table(table))
        total = time.perf_counter() - began
        print(f"demo finished in {total:.0f} s; the run is kept in {run_dir} (tcsm sample --run "
              f"{run_dir}, tcsm plot --run {run_dir})", flush=True)
        return {"steps": summary["step"], "tokens_per_s": summary["tokens_per_s"],
                "evaluation": evaluation, "samples": samples, "loss_table": table,
                "seconds": total}
    finally:
        shutil.rmtree(workdir / "calibration", ignore_errors=True)
