"""Pre-training a diffusion LM with ``fused_tcsm_loss`` (data target), on one process or many.

Each step draws its global batch (window starts, times, noise) from a generator keyed by
(seed, step) alone, so the batch does not depend on the number of ranks or on whether the run
was resumed: rank r of W reads rows [r B / W, (r + 1) B / W) of it and splits them into
``grad_accum`` micro-batches. Every micro-batch loss is divided by the global normalizer
(/ W, since DDP averages gradients over ranks), so the summed gradient equals that of the
whole global batch at once.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint, distributed
from .data import DataError, TokenCorpus, batch_starts, prepare_corpus, read_windows, step_generator
from .evaluate import nelbo_bits
from .progress import MetricsLog, ProgressBar
from .run import (CHECKPOINT_DIR, METRICS_FILE, ConfigError, TrainConfig, autocast_dtype,
                  build_model, make_process, mask_token, read_config, resolve_device, save_config)

IGNORE = -100


@dataclass
class Session:
    """Options of one invocation that may change when a run is resumed."""

    out: str
    resume: Optional[str] = None  # None: start a new run; "last" or a checkpoint path: resume
    device: str = "auto"
    threads: Optional[int] = None
    stop_after: Optional[int] = None  # stop (with a checkpoint) once this step is done
    time_limit: Optional[float] = None  # seconds; stop (with a checkpoint) when exceeded
    log_every: int = 10
    quiet: bool = False


class WarmupCosine:
    """Learning-rate factor after ``s`` optimizer steps: linear warm-up, then cosine decay to
    ``min_ratio``."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / self.warmup
        progress = min((s - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def stratified_times(batch: int, generator: torch.Generator) -> torch.Tensor:
    """(batch,) times t_i = (i + u) / batch with one uniform u: an even cover of [0, 1)."""
    return (torch.arange(batch) + torch.rand(1, generator=generator)) / batch


@dataclass
class StepBatch:
    """This rank's share of a global batch: model inputs, loss target and weight."""

    x_t: torch.Tensor  # (b, L)
    t: torch.Tensor  # (b,)
    target: torch.Tensor  # (b, L), IGNORE where no loss
    weight: Optional[torch.Tensor]  # (b, 1) or None
    normalizer: float  # global normalizer / world size


def make_batch(config: TrainConfig, corpus: TokenCorpus, process, step: int,
               world: distributed.World) -> StepBatch:
    """Global batch of ``step`` (CPU): every rank draws all of its random numbers, reads only
    its own rows."""
    generator = step_generator(config.seed, step)
    global_batch, length = config.batch_size, config.seq_len
    starts = batch_starts(len(corpus.train), global_batch, length, generator)
    t = stratified_times(global_batch, generator)
    per_rank = global_batch // world.size
    rows = slice(world.rank * per_rank, (world.rank + 1) * per_rank)
    x1 = torch.zeros(global_batch, length, dtype=torch.int64)
    x1[rows] = read_windows(corpus.train, starts[rows], length)
    x_t = process.sample(x1, t, generator=generator)
    carries_loss = x_t == process.mask_id if config.masked else torch.ones_like(x_t, dtype=bool)
    target = torch.where(carries_loss, x1, IGNORE)
    if config.time_weight == "elbo":  # unbiased NELBO per token (nats)
        weight = process.schedule.time_weight(t)[:, None]
        normalizer = float(global_batch * length)
    else:  # mean loss over the loss-carrying positions of the global batch
        weight = None
        normalizer = float(max(int(carries_loss.sum()), 1))
    return StepBatch(x_t[rows], t[rows], target[rows],
                     None if weight is None else weight[rows], normalizer / world.size)


def _start_run(config: TrainConfig, run_dir: Path, world: distributed.World) -> None:
    """Create the run directory with its corpus and config (rank 0); all ranks fail together."""
    error = None
    if world.is_main:
        created = not run_dir.exists()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            prepare_corpus(run_dir, config.data, config.vocab, config.val_fraction, config.seq_len)
            save_config(run_dir, config)
        except (DataError, OSError) as err:
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)
            error = str(err)
    error = distributed.share_error(world, error)
    if error:
        raise DataError(error)


def check_new_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(f"--out {run_dir} already exists and is not empty; resume that run "
                          f"with --resume, or choose another --out")


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps (then it checkpoints)."""

    def __init__(self):
        self.raised = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(config: Optional[TrainConfig], session: Session) -> dict:
    """Train (or resume) the run in ``session.out``; returns a summary of the final step.

    ``config`` is None when resuming (the run's saved config is used).
    """
    run_dir = Path(session.out)
    if session.threads:
        torch.set_num_threads(session.threads)
    device = resolve_device(session.device)
    if session.resume is None:
        check_new_run_dir(run_dir)
    else:
        config = read_config(run_dir)
    config.validate(int(os.environ.get("WORLD_SIZE", "1")), new_run=session.resume is None)
    world = distributed.setup(device)
    try:
        state = None
        if session.resume is None:
            _start_run(config, run_dir, world)
        else:
            path = (run_dir / CHECKPOINT_DIR / checkpoint.LAST if session.resume == "last"
                    else Path(session.resume))
            state = checkpoint.load(path)
        return _train_loop(config, session, run_dir, world, state)
    finally:
        distributed.teardown(world)


def _param_groups(model, weight_decay: float):
    """Weight decay on matrices only (not on norms or biases)."""
    decay = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _train_loop(config: TrainConfig, session: Session, run_dir: Path, world: distributed.World,
                state: Optional[dict]) -> dict:
    from ..ops.loss import fused_tcsm_loss

    corpus = TokenCorpus(run_dir, config.val_fraction)
    process = make_process(config, corpus)
    mask = mask_token(config, corpus)
    torch.manual_seed(config.seed)
    model = build_model(config, corpus).to(world.device)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr,
                                  betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(config.warmup, config.steps, config.min_lr_ratio))
    step, elapsed_before = 0, 0.0
    metrics = MetricsLog(run_dir / METRICS_FILE, enabled=world.is_main)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        step, elapsed_before = state["step"], state["elapsed_s"]
        metrics.truncate_after(step)
    ddp = (DistributedDataParallel(model, device_ids=[world.device.index]
                                   if world.device.type == "cuda" else None)
           if world.distributed else model)
    cast = autocast_dtype(config, world.device)
    tokens_per_step = config.batch_size * config.seq_len
    micro = config.batch_size // (world.size * config.grad_accum)
    last_step = min(config.steps, session.stop_after or config.steps)
    progress = ProgressBar(config.steps, step, world.is_main and not session.quiet)
    pending, started, eval_seconds, first_step, loss_value = [], time.perf_counter(), 0.0, step, float("nan")

    def elapsed():
        return elapsed_before + time.perf_counter() - started

    def flush(stop_requested: bool) -> bool:
        """Write pending per-step losses (one reduction over ranks); returns the stop decision."""
        nonlocal loss_value, pending
        if not pending:
            return stop_requested
        flag = torch.tensor([float(stop_requested)], device=world.device)
        losses = torch.cat([torch.stack([p[1] for p in pending]).float(), flag])
        losses = distributed.mean(world, losses).cpu()
        metrics.write([{"step": s, "loss": float(v), "lr": lr, "tokens": s * tokens_per_step,
                        "elapsed_s": round(e, 3)}
                       for (s, _, lr, e), v in zip(pending, losses[:-1].tolist())])
        loss_value = float(losses[-2])
        rate = (pending[-1][0] - first_step) * tokens_per_step / max(
            time.perf_counter() - started - eval_seconds, 1e-9)
        progress.update(pending[-1][0], loss_value, rate)
        pending = []
        return bool(losses[-1] > 0)

    def save():
        if world.is_main:
            checkpoint.save(run_dir / CHECKPOINT_DIR, {
                "step": step, "config": config.__dict__, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                "data_position": {"sequences_seen": step * config.batch_size},
                "elapsed_s": elapsed()})

    model.train()
    with StopSignal() as stop_signal:
        stop = False
        while step < last_step and not stop:
            step += 1
            batch = make_batch(config, corpus, process, step, world)
            total = torch.zeros((), device=world.device)
            for m in range(config.grad_accum):
                rows = slice(m * micro, (m + 1) * micro)
                sync = contextlib.nullcontext() if (m == config.grad_accum - 1
                                                    or not world.distributed) else ddp.no_sync()
                with sync:
                    with (torch.autocast(world.device.type, dtype=cast) if cast
                          else contextlib.nullcontext()):
                        logits = ddp(batch.x_t[rows].to(world.device), batch.t[rows].to(world.device))
                    weight = None if batch.weight is None else batch.weight[rows].to(world.device)
                    loss = fused_tcsm_loss(logits, batch.target[rows].to(world.device),
                                           divergence=config.divergence, weight=weight,
                                           mask_id=mask, normalizer=batch.normalizer)
                    loss.backward()
                total += loss.detach()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            pending.append((step, total, lr, elapsed()))
            at_end = step == last_step
            if step % session.log_every == 0 or at_end:
                too_long = session.time_limit is not None and elapsed() > session.time_limit
                stop = flush(stop_signal.raised or too_long)
            if config.eval_every and (step % config.eval_every == 0 or at_end or stop):
                if world.is_main:
                    began = time.perf_counter()
                    result = nelbo_bits(model, corpus.val, process, mask, seq_len=config.seq_len,
                                        time_samples=config.eval_times,
                                        max_sequences=config.eval_sequences,
                                        device=world.device, autocast=cast)
                    metrics.write([{"step": step, "val_bits": result.bits_per_token}])
                    eval_seconds += time.perf_counter() - began
                distributed.barrier(world)
            if (config.ckpt_every and step % config.ckpt_every == 0) or at_end or stop:
                flush(False)
                save()
    progress.close()
    return {"step": step, "steps": config.steps, "loss": loss_value, "elapsed_s": elapsed(),
            "tokens_per_s": (step - first_step) * tokens_per_step / max(
                time.perf_counter() - started - eval_seconds, 1e-9),
            "stopped_early": step < config.steps}
