"""The training loop: a ``Trainer`` (pre-training with ``fused_tcsm_loss`` on the data target by
default; subclasses swap the model or the step), run directories, sessions and resume.

Each step's global batch comes from ``batches.make_batch`` (keyed by seed and step). Every
micro-batch loss is divided by the global normalizer (/ W, since DDP averages gradients over
ranks), so the summed gradient equals that of the whole global batch at once. With
``vocab_parallel`` every rank reads the whole batch (no / W, no DDP) and holds a shard of the
LM head (``Trainer.head_shard``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Type

import torch
from torch.nn.parallel import DistributedDataParallel

from ..distributed import vocab_parallel_linear_tcsm_loss
from ..ops.linear_loss import fused_linear_tcsm_loss
from ..ops.loss import fused_tcsm_loss
from . import checkpoint, distributed
from .batches import make_batch
from .data import DataError, TokenCorpus, prepare_corpus
from .evaluate import nelbo_bits
from .files import write_json_atomic
from .progress import MetricsLog, ProgressBar
from .run import (CHECKPOINT_DIR, METRICS_FILE, ConfigError, LossInfo, TrainConfig,
                  autocast_dtype, build_model, make_process, mask_token, read_config,
                  resolve_device, save_config, save_loss_info)


@dataclass
class Session:
    """Options of one invocation that may change when a run is resumed."""

    out: str
    resume: Optional[str] = None  # None: start a new run; "last" or a checkpoint path: resume
    device: str = "auto"
    threads: Optional[int] = None
    stop_after: Optional[int] = None  # stop (with a checkpoint) once this step is done
    time_limit: Optional[float] = None  # seconds of this invocation; then stop (with a checkpoint)
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


def check_new_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(f"--out {run_dir} already exists and is not empty; resume that run "
                          f"with --resume, or choose another --out")


def create_run(config: TrainConfig, run_dir: Path) -> None:
    """A new run directory with its corpus and config; on failure nothing is left behind."""
    check_new_run_dir(run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        prepare_corpus(run_dir, config.data, config.vocab, config.val_fraction, config.seq_len)
        save_config(run_dir, config)
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def start_run(config: TrainConfig, run_dir: Path, world: distributed.World) -> None:
    """Rank 0 creates the run; with several ranks, all of them fail together."""
    if not world.distributed:
        create_run(config, run_dir)
        return
    error = None
    if world.is_main:
        try:
            create_run(config, run_dir)
        except (ConfigError, DataError, OSError) as err:
            error = str(err)
    error = distributed.share_error(world, error)
    if error:
        raise ConfigError(error)


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps (then it checkpoints)."""

    def __init__(self):
        self.raised = False
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals need the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def open_session(config: Optional[TrainConfig], session: Session):
    """(run directory, device, config) for a session: threads set, and the run's saved config
    read back when resuming."""
    if session.threads:
        torch.set_num_threads(session.threads)
    run_dir = Path(session.out)
    if session.resume is not None:
        config = read_config(run_dir)
    return run_dir, resolve_device(session.device), config


def extend_run(run_dir: Path, steps: int) -> TrainConfig:
    """Raise a run's step count to ``steps`` (its config.json rewritten; the same count again
    changes nothing). The cosine decay keeps the horizon it was planned with, so the steps
    already planned keep their learning rates and the extra ones train at the final rate."""
    config = read_config(run_dir)
    if steps < config.steps:
        raise ConfigError(f"--steps {steps}: a resumed run can only be extended; it has "
                          f"{config.steps} steps")
    if steps > config.steps:
        config = dataclasses.replace(config, steps=steps, decay_steps=config.lr_decay_steps)
        save_config(run_dir, config)
    return config


def resume_checkpoint(run_dir: Path, resume: str) -> Path:
    """The checkpoint a ``--resume`` value names: "last" or a file path."""
    return run_dir / CHECKPOINT_DIR / checkpoint.LAST if resume == "last" else Path(resume)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """Weight decay on matrices only (not on norms or biases)."""
    decay = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class Trainer:
    """The state of one training invocation: model, optimizer, schedule, logs, step."""

    def __init__(self, config: TrainConfig, session: Session, run_dir: Path,
                 world: distributed.World):
        self.config, self.session, self.run_dir, self.world = config, session, run_dir, world
        self.corpus = TokenCorpus(run_dir, config.val_fraction)
        self.process = make_process(config, self.corpus)
        self.mask_id = mask_token(config, self.corpus)
        torch.manual_seed(config.seed)
        self.replace_model(build_model(config, self.corpus))
        self.metrics = MetricsLog(run_dir / METRICS_FILE, enabled=world.is_main)
        self.cast = autocast_dtype(config, world.device)
        self.tokens_per_step = config.batch_size * config.seq_len
        self.step, self.elapsed_before = 0, 0.0
        self.pending = []  # (step, loss tensor, lr, elapsed) not yet written
        self.last_loss = float("nan")
        self.started, self.first_step, self.eval_seconds = time.perf_counter(), 0, 0.0
        self.progress = ProgressBar(config.steps, 0, enabled=False)
        self.pool = None  # window starts (W,) to draw batches from; None: the whole split
        if world.is_main:
            save_loss_info(run_dir, self.loss_info())

    def loss_info(self) -> LossInfo:
        """What the logged loss is (the run's loss.json: the summary and the plot read it)."""
        return LossInfo.data_target(self.config)

    def replace_model(self, model: torch.nn.Module) -> None:
        """Train ``model`` with a new AdamW optimizer and warm-up/cosine schedule (frozen
        parameters get no gradient, so AdamW leaves them alone)."""
        config = self.config
        self.model = model.to(self.world.device)
        self.optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay),
                                           lr=config.lr, betas=(0.9, 0.99))
        schedule = WarmupCosine(config.warmup, config.lr_decay_steps, config.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.elapsed_before = state["step"], state["elapsed_s"]
        self.first_step = self.step
        self.metrics.truncate_after(self.step)
        self.last_loss = self.metrics.last("loss")

    def elapsed(self) -> float:
        """Training seconds of the whole run, this invocation included."""
        return self.elapsed_before + time.perf_counter() - self.started

    def apply_gradients(self, loss: torch.Tensor) -> None:
        """Clip the accumulated gradients, take the optimizer and schedule step, and queue the
        step's (detached) ``loss`` for the metrics log."""
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending.append((self.step, loss, lr, self.elapsed()))

    @property
    def data_world(self) -> distributed.World:
        """The ranks that split each global batch: all of them (DDP), or with ``vocab_parallel``
        a one-rank view (every rank reads the whole batch)."""
        if self.config.vocab_parallel:
            return distributed.World(0, 1, self.world.device)
        return self.world

    def head_shard(self) -> Tuple[torch.Tensor, int]:
        """This rank's rows [start, end) of the tied head (``distributed.vocab_shard``) as a
        leaf of their own, and start: the ``vocab_parallel`` head.

        The reference loop replicates the body and the tied table on every rank and splits only
        the head: each rank forms its shard's logits and their gradient (never the (N, V)
        ones), and the loss sums the hidden states' gradient over the ranks, so the body gets
        the same gradient on every rank without DDP. ``add_head_gradient`` gathers the shards'
        gradients into the tied table, O(V D) per step like DDP's all-reduce would be; a model
        with a vocabulary-parallel embedding would keep its shard and skip that gather.
        """
        weight = self.model.token_embedding.weight
        start, end = distributed.vocab_shard(len(weight), self.world.rank, self.world.size)
        return weight.detach()[start:end].requires_grad_(), start

    def add_head_gradient(self, shard: torch.Tensor) -> None:
        """Add every rank's accumulated head-shard gradient, gathered into (V, D), to the tied
        table's gradient (the embedding lookup's part): every rank then holds the gradient of
        the unsplit run."""
        weight = self.model.token_embedding.weight
        weight.grad.add_(distributed.gather_vocab_shards(self.world, shard.grad, len(weight)))

    def step_on_loss(self, loss: torch.Tensor) -> None:
        """One-process optimizer step on a whole-batch ``loss``: backward, then
        ``apply_gradients``."""
        loss.backward()
        self.apply_gradients(loss.detach())

    def train_step(self, ddp) -> None:
        """One optimizer step on the global batch of ``self.step + 1``."""
        self.step += 1
        config, device, data_world = self.config, self.world.device, self.data_world
        batch = make_batch(config, self.corpus, self.process, self.step, data_world, self.pool)
        micro = config.batch_size // (data_world.size * config.grad_accum)
        # The vocabulary-parallel ops need a process group: one process keeps the full head.
        split_head = config.vocab_parallel and self.world.distributed
        head_shard, vocab_start = self.head_shard() if split_head else (None, 0)
        total = torch.zeros((), device=device)
        for m in range(config.grad_accum):
            rows = slice(m * micro, (m + 1) * micro)
            last_micro = m == config.grad_accum - 1
            sync = (ddp.no_sync() if data_world.distributed and not last_micro
                    else contextlib.nullcontext())
            cast = (torch.autocast(device.type, dtype=self.cast) if self.cast
                    else contextlib.nullcontext())
            with sync:
                with cast:
                    out = ddp(batch.x_t[rows].to(device), batch.t[rows].to(device),
                              features_only=config.fused_head)
                weight = None if batch.weight is None else batch.weight[rows].to(device)
                target = batch.target[rows].to(device)
                options = dict(divergence=config.divergence, mask_id=self.mask_id,
                               normalizer=batch.normalizer)
                if head_shard is not None:  # out: hidden states (b, L, D), same on every rank
                    loss = vocab_parallel_linear_tcsm_loss(
                        out, head_shard.to(out.dtype), target, vocab_start=vocab_start,
                        vocab_size=len(self.model.token_embedding.weight), weight=weight,
                        **options)
                elif config.fused_head:  # out: hidden states (b, L, D) of the tied head
                    head = self.model.token_embedding.weight
                    loss = fused_linear_tcsm_loss(out, head.to(out.dtype), target,
                                                  weight_rows=weight, **options)
                else:
                    loss = fused_tcsm_loss(out, target, weight=weight, **options)
                loss.backward()
            total += loss.detach()
        if head_shard is not None:
            self.add_head_gradient(head_shard)
        self.apply_gradients(total)

    def tokens_per_second(self) -> float:
        seconds = time.perf_counter() - self.started - self.eval_seconds
        return (self.step - self.first_step) * self.tokens_per_step / max(seconds, 1e-9)

    def flush(self, stop_requested: bool = False) -> bool:
        """Write the pending per-step losses (one reduction over ranks, which also agrees on
        stopping: any rank asking stops all); returns the stop decision."""
        if not self.pending:
            return stop_requested
        flag = torch.tensor([float(stop_requested)], device=self.world.device)
        values = torch.cat([torch.stack([p[1] for p in self.pending]).float(), flag])
        values = distributed.mean(self.world, values).cpu().tolist()
        self.metrics.write([{"step": s, "loss": v, "lr": lr, "tokens": s * self.tokens_per_step,
                             "elapsed_s": round(e, 3)}
                            for (s, _, lr, e), v in zip(self.pending, values[:-1])])
        self.last_loss = values[-2]
        name = "loss estimate" if self.loss_info().estimate else "loss"
        self.progress.update(self.step, f"{name} {self.last_loss:.4f}  "
                                        f"{self.tokens_per_second() / 1e3:.1f}k tok/s")
        self.pending = []
        return values[-1] > 0

    def evaluate(self) -> None:
        """Validation NELBO record (rank 0; the others wait)."""
        if self.world.is_main:
            began = time.perf_counter()
            result = nelbo_bits(self.model, self.corpus.val, self.process, self.mask_id,
                                seq_len=self.config.seq_len, time_samples=self.config.eval_times,
                                max_sequences=self.config.eval_sequences,
                                device=self.world.device, autocast=self.cast)
            self.metrics.write([{"step": self.step, "val_bits": result.bits_per_token}])
            self.eval_seconds += time.perf_counter() - began
        distributed.barrier(self.world)

    def save(self) -> None:
        self.flush()
        if self.world.is_main:
            checkpoint.save(self.run_dir / CHECKPOINT_DIR, {
                "step": self.step, "config": dataclasses.asdict(self.config),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "cuda": (
                    torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])},
                "data_position": {"sequences_seen": self.step * self.config.batch_size},
                "elapsed_s": self.elapsed()})

    def run(self) -> dict:
        """Train up to ``steps`` (or the session's stop); returns a summary."""
        config, session = self.config, self.session
        ddp = self.model
        if self.data_world.distributed:
            ddp = DistributedDataParallel(self.model, device_ids=[self.world.device.index]
                                          if self.world.device.type == "cuda" else None)
        last_step = min(config.steps, session.stop_after or config.steps)
        self.progress = ProgressBar(config.steps, self.step,
                                    self.world.is_main and not session.quiet)
        self.started = time.perf_counter()
        self.model.train()
        stop = False
        with StopSignal() as stop_signal:
            while self.step < last_step and not stop:
                self.train_step(ddp)
                at_end = self.step == last_step
                if self.step % session.log_every == 0 or at_end:
                    too_long = (session.time_limit is not None
                                and time.perf_counter() - self.started > session.time_limit)
                    stop = self.flush(stop_signal.raised or too_long)
                if config.eval_every and (self.step % config.eval_every == 0 or at_end or stop):
                    self.evaluate()
                if (config.ckpt_every and self.step % config.ckpt_every == 0) or at_end or stop:
                    self.save()
        self.progress.close()
        return {"step": self.step, "steps": config.steps, "loss": self.last_loss,
                "loss_label": self.loss_info().label, "trained_steps": self.step - self.first_step,
                "elapsed_s": self.elapsed(), "tokens_per_s": self.tokens_per_second(),
                "stopped_early": self.step < config.steps}


def run_trainer(trainer_class: Type[Trainer], config: TrainConfig, session: Session,
                run_dir: Path, world: distributed.World, **trainer_options) -> dict:
    """Build ``trainer_class`` on an existing run directory, restore the session's checkpoint
    when resuming, and train; returns the summary."""
    state = (None if session.resume is None
             else checkpoint.load(resume_checkpoint(run_dir, session.resume)))
    trainer = trainer_class(config, session, run_dir, world, **trainer_options)
    if state is not None:
        trainer.restore(state)
    return trainer.run()


def train(config: Optional[TrainConfig], session: Session) -> dict:
    """Pre-train (or resume) the run in ``session.out`` on one process or many (torchrun);
    returns a summary of the final step. ``config`` is None when resuming (the run's saved
    config is used)."""
    run_dir, device, config = open_session(config, session)
    config.validate(int(os.environ.get("WORLD_SIZE", "1")), new_run=session.resume is None)
    world = distributed.setup(device)
    finished = False
    try:
        if session.resume is None:
            start_run(config, run_dir, world)
        summary = run_trainer(Trainer, config, session, run_dir, world)
        finished = True
        return summary
    finally:
        distributed.teardown(world, finished)


def train_single_process(trainer_class: Type[Trainer], config: Optional[TrainConfig],
                         session: Session, run_files: Optional[Dict[str, dict]] = None,
                         **trainer_options) -> dict:
    """Create (or resume) a run in ``session.out`` on one process and train it with
    ``trainer_class(config, session, run_dir, world, **trainer_options)``; ``run_files``
    ({file name: JSON data}) are written into a new run beside its config."""
    run_dir, device, config = open_session(config, session)
    config.validate(new_run=session.resume is None)
    if config.grad_accum != 1 or not config.masked:
        raise ConfigError("this command runs on one process with --grad-accum 1 and --process "
                          "masked")
    if session.resume is None:
        create_run(config, run_dir)
        for name, data in (run_files or {}).items():
            write_json_atomic(run_dir / name, data)
    return run_trainer(trainer_class, config, session, run_dir,
                       distributed.World(0, 1, device), **trainer_options)
