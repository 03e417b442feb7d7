"""The global batch of one training step: window starts, times and noise drawn from a generator
keyed by (seed, step) alone, so the batch depends neither on the number of ranks nor on whether
the run was resumed. Rank r of W reads rows [r B / W, (r + 1) B / W) of it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import distributed
from .data import TokenCorpus, batch_starts, read_windows, step_generator
from .run import TrainConfig

IGNORE = -100  # target of the positions that carry no loss


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
    pool_rows: Optional[torch.Tensor] = None  # (b,) rows of the window pool drawn, if any


def make_batch(config: TrainConfig, corpus: TokenCorpus, process, step: int,
               world: distributed.World, pool: Optional[np.ndarray] = None) -> StepBatch:
    """Global batch of ``step`` (CPU): every rank draws all of its random numbers, reads only
    its own rows. Windows start anywhere in the training split, or, with ``pool`` (W,) window
    starts (a cached-target store's), at pool entries drawn uniformly."""
    generator = step_generator(config.seed, step)
    global_batch, length = config.batch_size, config.seq_len
    pool_rows = None
    if pool is None:
        starts = batch_starts(len(corpus.train), global_batch, length, generator)
    else:
        pool_rows = torch.randint(0, len(pool), (global_batch,), generator=generator)
        starts = np.asarray(pool)[pool_rows.numpy()]
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
                     None if weight is None else weight[rows], normalizer / world.size,
                     None if pool_rows is None else pool_rows[rows])
