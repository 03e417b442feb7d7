"""Vocabulary shards over a process group: the layout check every rank agrees on, the
collectives the loss differentiates through, and ``ShardColumns``, the reference's
``Columns`` for a slice of the vocabulary.

Every value the loss is built from is reduced over the ranks, so each rank holds the same
(replicated) loss. Gradients follow the usual tensor-parallel rule: the backward of a sum
over ranks sums the gradients over the ranks, and the replicated loss seeds each rank's
backward with 1 / P of the upstream gradient (``share_of_gradient``). Then a replicated value
(the row LSE, say) gets its direct gradient once and the gradient through every rank's
partial sums, and each rank's autograd yields exactly the gradient of its own shard. No
(N, V) tensor is ever gathered: every collective carries (N,) or (N, K) values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist

from .. import _checks
from ..columns import Columns


T = TypeVar("T")


class ShardError(ValueError):
    """Raised on every rank when any rank's inputs are bad (the message names the ranks)."""


@dataclass(frozen=True)
class ShardLayout:
    """This rank's columns [start, start + width) of a vocabulary of ``vocab_size``, within a
    group of ``world`` ranks (``rank`` is this rank's index in the group)."""

    start: int
    width: int
    vocab_size: int
    rank: int
    world: int
    group: Optional[dist.ProcessGroup]


def _check_layout(starts: List[int], widths: List[int], vocab_size: int) -> Optional[str]:
    """None when the shards, in rank order, tile [0, vocab_size) exactly."""
    end = 0
    for rank, (start, width) in enumerate(zip(starts, widths)):
        if start != end:
            kind = "overlaps the previous shard" if start < end else "leaves a gap before it"
            return (f"rank {rank}'s shard [{start}, {start + width}) {kind} (the previous ends "
                    f"at {end}); shards must tile [0, vocab_size) in rank order")
        end = start + width
    if end != vocab_size:
        return (f"the shards cover [0, {end}) but vocab_size={vocab_size}: the group has "
                f"{len(starts)} ranks with widths {widths}")
    return None


def agree(local_check: Callable[[], T], start: int, width: int, vocab_size: int,
          group: Optional[dist.ProcessGroup]) -> Tuple[ShardLayout, T]:
    """Runs this rank's validation, then ONE small collective (every rank's start, width and
    error) before any collective on data: a bad input on any rank raises ``ShardError`` on
    every rank (no rank is left waiting), with each failing rank's message. Returns the layout
    and what the validation returned (the validated inputs)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocabulary-parallel ops need torch.distributed to be initialised "
                           "(dist.init_process_group)")
    error, checked = None, None
    try:
        checked = local_check()
    except (TypeError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    world = dist.get_world_size(group)
    reports: list = [None] * world
    dist.all_gather_object(reports, (start, width, error), group=group)
    errors = [f"rank {r}: {report[2]}" for r, report in enumerate(reports) if report[2]]
    if not errors:
        layout_error = _check_layout([r[0] for r in reports], [r[1] for r in reports],
                                     vocab_size)
        if layout_error:
            errors = [layout_error]
    if errors:
        raise ShardError("; ".join(errors))
    return ShardLayout(start, width, vocab_size, dist.get_rank(group), world, group), checked


def _all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def check_shard(name: str, shard: torch.Tensor, vocab_start: int, vocab_size: int) -> None:
    """Local checks of a shard (..., width) of columns [vocab_start, vocab_start + width)."""
    _checks.python_int("vocab_size", vocab_size)
    _checks.python_int("vocab_start", vocab_start)
    _checks.tensor(name, shard, _checks.FLOAT_DTYPES)
    if shard.dim() < 1:
        raise ValueError(f"{name} must have shape (..., shard)")
    end = vocab_start + shard.shape[-1]
    if not 0 <= vocab_start <= end <= vocab_size:
        raise ValueError(f"{name}'s columns [{vocab_start}, {end}) are not inside "
                         f"[0, vocab_size={vocab_size})")


def shard_width(shard) -> int:
    """The shard's column count as this rank reports it (0 for what is not a shard)."""
    return shard.shape[-1] if isinstance(shard, torch.Tensor) and shard.dim() else 0


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM); backward: all_reduce(SUM) of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce_sum(grad, ctx.group), None


class _ShareOfGradient(torch.autograd.Function):
    """Identity whose backward takes 1 / P of the gradient: the replicated loss, whose P
    copies' backwards meet in the sums over ranks."""

    @staticmethod
    def forward(ctx, x, world):
        ctx.world = world
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.world, None


class _GradSumOverRanks(torch.autograd.Function):
    """Identity whose backward sums the gradient over the ranks: an input every rank holds
    (the hidden states before a column-split head) gets the sum of the shards' gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce_sum(grad, ctx.group), None


def sum_over_ranks(x: torch.Tensor, group) -> torch.Tensor:
    return _SumOverRanks.apply(x, group)


def grad_sum_over_ranks(x: torch.Tensor, group) -> torch.Tensor:
    return _GradSumOverRanks.apply(x, group)


def share_of_gradient(x: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    return _ShareOfGradient.apply(x, layout.world)


def max_over_ranks(x: torch.Tensor, group) -> torch.Tensor:
    """Elementwise max over the ranks (no gradient: used as a shift or a test)."""
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


class ShardColumns(Columns):
    """The participating columns this rank holds: global columns [start, start + width) with
    the mask column dropped where this rank holds it. Reductions are completed over the group;
    ids (participating space) outside the shard read as 0 locally and come from their owner."""

    def __init__(self, layout: ShardLayout, mask_id: Optional[int]):
        super().__init__(layout.vocab_size, mask_id)
        self.group = layout.group
        owns_mask = mask_id is not None and layout.start <= mask_id < layout.start + layout.width
        self.local_mask = mask_id - layout.start if owns_mask else None
        self.first = layout.start - (mask_id is not None and mask_id < layout.start)
        self.held = layout.width - owns_mask

    def participating(self, rows: torch.Tensor) -> torch.Tensor:
        return Columns(rows.shape[1], self.local_mask).participating(rows)

    def local(self, per_column: torch.Tensor) -> torch.Tensor:
        return per_column[self.first:self.first + self.held]

    def sum(self, x):
        return sum_over_ranks(x.sum(1), self.group)

    def amax(self, x):
        local = x.amax(1) if x.shape[1] else x.new_full(x.shape[:1], float("-inf"))
        return max_over_ranks(local, self.group)

    def logsumexp(self, x):
        # LSE = m + log sum_ranks sum_cols exp(x - m), m the global max (a constant shift:
        # no gradient flows through it, as for torch.logsumexp); rows of only -inf stay -inf.
        shift = self.amax(x)
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        return shift + torch.log(self.sum(torch.exp(x - shift[:, None])))

    def any(self, x):
        local = x.any(1).to(torch.int32) if x.shape[1] else x.new_zeros(x.shape[:1],
                                                                        dtype=torch.int32)
        return max_over_ranks(local, self.group) > 0

    def _owned(self, ids):
        owned = (ids >= self.first) & (ids < self.first + self.held)
        return owned, (ids - self.first).clamp(0, max(self.held - 1, 0))

    def gather(self, x, ids):
        owned, local_ids = self._owned(ids)
        if self.held == 0:
            # zeros still tied to x: every rank's sum must be in its autograd graph, or the
            # other ranks' backward would wait for this one's all-reduce
            mine = x.new_zeros(ids.shape) + 0 * x.sum()
        else:
            mine = torch.where(owned, x.gather(1, local_ids), torch.zeros((), dtype=x.dtype))
        return sum_over_ranks(mine, self.group)

    def members(self, ids, counted, like):
        if self.held == 0:
            return torch.zeros(like.shape, dtype=torch.bool, device=like.device)
        owned, local_ids = self._owned(ids)
        return super().members(local_ids, counted & owned, like)
