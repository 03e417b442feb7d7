"""Vocabulary-parallel CTMC step (docs/math.md 7): each rank holds logits (..., V / P) for its
slice of the vocabulary; the drawn tokens equal the single-process step's with the same seed.

x1 is the inverse-CDF draw of the row's Philox uniform u (the same on every rank): with the
global max as shift, rank r's block total t_r and the (P, N) totals gathered, the owner of the
draw is the first rank whose cumulative total exceeds u * sum_r t_r; it alone scans its block.
O(N P) values cross the group, never the logits. The CDF is summed per block and then offset,
where the single-process step sums it in one pass: the two can differ in the last bit, which
moves a draw only when u * total falls within that rounding of a column boundary (probability
about 1e-16 per row in float64).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from .. import _checks, philox
from ..ops.step_output import step_result
from .shards import agree, check_shard, max_over_ranks, shard_width


def _gather_rows(x: torch.Tensor, layout) -> torch.Tensor:
    """(N, ...) from every rank -> (P, N, ...) in rank order."""
    parts = [torch.empty_like(x) for _ in range(layout.world)]
    dist.all_gather(parts, x.contiguous(), group=layout.group)
    return torch.stack(parts)


def vocab_parallel_ctmc_step(logits_shard: torch.Tensor, x: torch.Tensor,
                             jump_prob: torch.Tensor, *, vocab_start: int, vocab_size: int,
                             group: Optional[dist.ProcessGroup] = None,
                             mask_id: Optional[int] = None, temperature: float = 1.0,
                             frozen: Optional[torch.Tensor] = None,
                             seed: Union[int, torch.Tensor] = 0, offset: int = 0,
                             return_x1: bool = False, return_confidence: bool = False,
                             check: Optional[bool] = None):
    """``ctmc_step`` of the logits whose columns [vocab_start, vocab_start + shard) this rank
    holds as ``logits_shard`` (..., shard); x, jump_prob, frozen, seed and offset are the same
    on every rank, ``mask_id`` is a global id. Every rank returns the same result. Bad input on
    any rank raises ``ShardError`` on every rank before any collective on data."""
    def validate():
        check_shard("logits_shard", logits_shard, vocab_start, vocab_size)
        # validated against the full vocabulary, on a stand-in of its shape
        full = logits_shard.new_zeros(()).expand(logits_shard.shape[:-1] + (vocab_size,))
        return _checks.step_inputs(full, x, jump_prob, mask_id=mask_id, temperature=temperature,
                                   frozen=frozen, seed=seed, offset=offset, backend="reference",
                                   check=check)

    width = shard_width(logits_shard)
    layout, validated = agree(validate, vocab_start, width, vocab_size, group)
    _, flat_x, jump, flat_frozen, batch_shape, mask_id = validated
    n = flat_x.shape[0]
    z = logits_shard.reshape(n, width)
    u_draw, u_jump = philox.row_uniforms(seed, offset, n, device=z.device)
    scaled = z.double() / temperature
    if mask_id is not None and vocab_start <= mask_id < vocab_start + width:
        scaled[:, mask_id - vocab_start] = float("-inf")
    local_max = scaled.amax(1) if width else scaled.new_full((n,), float("-inf"))
    shift = max_over_ranks(local_max, layout.group)
    weights = torch.exp(scaled - shift[:, None])
    cdf = weights.cumsum(dim=1)
    block_total = cdf[:, -1] if width else weights.new_zeros(n)
    cumulative = _gather_rows(block_total, layout).cumsum(0)  # (P, N)
    total = cumulative[-1]
    _checks.finite_rows(total.float(), (("logits_shard", z),),
                        _checks.resolve_check(check, z.device))
    draw = u_draw * total
    owner = (cumulative <= draw[None]).sum(0)  # the first rank whose cumulative total > draw
    before = cumulative[layout.rank - 1] if layout.rank > 0 else torch.zeros_like(total)
    mine = owner == layout.rank
    if width:
        local_x1 = torch.searchsorted(before[:, None] + cdf, draw[:, None], right=True)[:, 0]
        local_x1 = local_x1.clamp(max=width - 1)
        candidate = torch.where(mine, vocab_start + local_x1, -1)
    else:
        candidate = torch.full((n,), -1, dtype=torch.int64, device=z.device)
    x1 = max_over_ranks(candidate, layout.group)

    may_change = torch.ones_like(flat_x, dtype=torch.bool) if mask_id is None else flat_x == mask_id
    if flat_frozen is not None:
        may_change &= ~flat_frozen
    moves = may_change & (u_jump < jump.double())
    x_next = torch.where(moves, x1, flat_x.long())

    probs = weights / total[:, None]
    local_ids = (x1 - vocab_start).clamp(0, max(width - 1, 0))
    here = (x1 >= vocab_start) & (x1 < vocab_start + width)
    picked = probs.gather(1, local_ids[:, None])[:, 0] if width else probs.new_zeros(n)
    prob = _sum_rows(torch.where(here, picked, 0.0), layout)
    local_top2 = torch.cat([probs, probs.new_zeros(n, 2)], 1).topk(2, dim=1).values
    top2 = _gather_rows(local_top2, layout).permute(1, 0, 2).reshape(n, -1).topk(2, 1).values
    margin = top2[:, 0] - (top2[:, 1] if vocab_size > 1 else 0)
    entropy = _sum_rows(-torch.where(probs > 0, probs * probs.log(), 0).sum(1), layout)
    return step_result(x_next, x1, prob.float(), margin.float(), entropy.float(), batch_shape,
                       return_x1, return_confidence)


def _sum_rows(x: torch.Tensor, layout) -> torch.Tensor:
    out = x.clone()
    dist.all_reduce(out, group=layout.group)
    return out
