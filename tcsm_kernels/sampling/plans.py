"""Unmasking plans of the masked samplers and the per-step tables of a schedule.

Which positions change in which step depends only on the seed, the schedule and the initial
mask (see the package docstring), so it is planned before the loop. Tables are computed on the
host once per call and copied to the device once (a CUDA-graph capture may not copy from the
host): ``model_times``, ``jump_probs``, ``JumpTable`` (methods exact/euler) and ``CountTable``
(confidence). Plans are drawn from a table on the device per run, with no host read:
``JumpPlan`` and ``CountPlan``; ``top_per_row`` picks the positions a step's count reveals.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional

import torch

from .. import philox
from ..schedules import Schedule

PLAN_OFFSET = 2**63 - 1  # Philox offset of the unmasking plan; steps use offsets 0..steps-1


def model_times(steps: int, batch: int, device) -> torch.Tensor:
    """(steps, B) float32: row k holds the model time t_k = k / steps for every sequence."""
    t = torch.arange(steps, dtype=torch.float64) / steps
    return t.to(device=device, dtype=torch.float32)[:, None].expand(steps, batch).contiguous()


def jump_probs(schedule: Schedule, steps: int, method: str) -> torch.Tensor:
    """(steps,) float64 on the host: per-step jump probability on the grid k / steps, by the
    schedule's ``jump_prob_exact`` (method "exact") or ``jump_prob_euler`` ("euler"); the last
    step (s = 1) is 1 so every remaining position jumps (math.md 7)."""
    grid = torch.arange(steps + 1, dtype=torch.float64) / steps
    t, s = grid[:-1], grid[1:]
    jump = schedule.jump_prob_exact(t, s) if method == "exact" else schedule.jump_prob_euler(t, s)
    jump = jump.to(torch.float64).clone()
    jump[-1] = 1.0
    if not bool(torch.isfinite(jump).all()) or bool(((jump < 0) | (jump > 1)).any()):
        raise ValueError(f"schedule {schedule!r} gives jump probabilities outside [0, 1] on the "
                         f"{steps}-step grid")
    return jump


def num_blocks(movable: torch.Tensor, block_length: Optional[int], steps: int) -> int:
    """Semi-autoregressive blocks: enough for the most masked row of movable (B, L) (one host
    read); 1 without ``block_length``."""
    if block_length is None:
        return 1
    most_masked = int(movable.sum(1).max())
    blocks = max(1, math.ceil(most_masked / block_length))
    if steps < blocks:
        raise ValueError(f"steps={steps} is fewer than the {blocks} blocks of "
                         f"block_length={block_length}; each block needs at least one step")
    return blocks


class JumpPlan(NamedTuple):
    """Methods exact/euler: the step (0..steps-1) in which each position unmasks; ``steps`` for
    positions that never change (frozen or not masked)."""

    unmask_step: torch.Tensor  # (B, L) int64

    def changes(self, steps: int) -> torch.Tensor:
        """(steps,) bool: the steps that unmask some position."""
        counts = torch.bincount(self.unmask_step.flatten(), minlength=steps + 1)
        return counts[:steps] > 0


class JumpTable(NamedTuple):
    """Methods exact/euler: P(a masked position is unmasked by step k), (steps,) float64 on the
    device, 1 at the last step."""

    unmasked_by: torch.Tensor

    @classmethod
    def build(cls, schedule: Schedule, steps: int, method: str, device) -> "JumpTable":
        unmasked_by = 1 - torch.cumprod(1 - jump_probs(schedule, steps, method), dim=0)
        unmasked_by[-1] = 1.0
        return cls(unmasked_by.to(device))

    def plan(self, movable: torch.Tensor, seed: philox.Seed) -> JumpPlan:
        """First-jump step of each movable (B, L) position, P(step <= k) = unmasked_by[k] =
        1 - prod_{j <= k}(1 - p_j), by inverse CDF of its Philox uniform."""
        steps = self.unmasked_by.shape[0]
        u, _ = philox.row_uniforms(seed, PLAN_OFFSET, movable.numel(), device=movable.device)
        step = torch.searchsorted(self.unmasked_by, u, right=True).reshape(movable.shape)
        return JumpPlan(torch.where(movable, step, torch.full_like(step, steps)))


class CountPlan(NamedTuple):
    """Method confidence: block of each position (-1: never changes), the block each step works
    on, and how many tokens each sequence reveals in each step."""

    block_id: torch.Tensor  # (B, L) int64
    block_of_step: List[int]  # (steps,) on the host
    counts: torch.Tensor  # (B, steps) int64
    leftover: torch.Tensor  # () bool: some movable position is still masked after the last step

    def changes(self, steps: int) -> torch.Tensor:
        """(steps,) bool: the steps that reveal some token."""
        return self.counts.sum(0) > 0


class CountTable(NamedTuple):
    """Method confidence: the blocks, the block each step works on (on the host and the
    device), each step's index inside its block, and without ``tokens_per_step`` the schedule's
    fraction of a block revealed after and before each step."""

    tokens_per_step: Optional[int]
    block_length: Optional[int]
    num_blocks: int
    block_of_step: List[int]  # (steps,)
    block_of_step_device: torch.Tensor  # (steps,) int64
    local_step: torch.Tensor  # (steps,) int64
    frac_after: Optional[torch.Tensor]  # (steps,) float64; None with tokens_per_step
    frac_before: Optional[torch.Tensor]

    @classmethod
    def build(cls, schedule: Schedule, steps: int, blocks: int, tokens_per_step: Optional[int],
              block_length: Optional[int], device) -> "CountTable":
        """Steps split evenly over the blocks; within a block of S steps the fraction revealed
        by local step i is F_i = (kappa((i+1)/S) - kappa(0)) / (1 - kappa(0)), 1 at i = S - 1."""
        block_steps = [steps // blocks + (j < steps % blocks) for j in range(blocks)]
        block_of_step = [j for j, n in enumerate(block_steps) for _ in range(n)]
        local_step = [i for n in block_steps for i in range(n)]
        frac_after = frac_before = None
        if tokens_per_step is None:
            after, before = [], []
            for n in block_steps:
                grid = torch.arange(n + 1, dtype=torch.float64) / n
                kappa = schedule.kappa(grid).to(torch.float64)
                frac = ((kappa - kappa[0]) / (1 - kappa[0])).clamp(0, 1)
                frac[-1] = 1.0
                after.append(frac[1:])
                before.append(frac[:-1])
            frac_after, frac_before = torch.cat(after).to(device), torch.cat(before).to(device)
        return cls(tokens_per_step, block_length, blocks, block_of_step,
                   torch.tensor(block_of_step, dtype=torch.int64, device=device),
                   torch.tensor(local_step, dtype=torch.int64, device=device),
                   frac_after, frac_before)

    def plan(self, movable: torch.Tensor) -> CountPlan:
        """Per-step counts for movable (B, L): block j of a sequence is its j-th run of
        ``block_length`` movable positions in position order (with a prompt prefix: LLaDA's
        blocks over the generated part); positions past the last block (possible only in a
        captured loop given more masks than at capture) never change. Local step i of a block
        with m masks reveals ``tokens_per_step``, or round(m F_i) - round(m F_{i-1}), so all m
        are revealed after the block's last step."""
        blocks = self.num_blocks
        if self.block_length is None:
            block_id = torch.where(movable, 0, -1)
        else:
            rank = movable.long().cumsum(1) - 1
            block_id = torch.where(movable & (rank < blocks * self.block_length),
                                   rank // self.block_length, -1)
        slot = torch.where(block_id >= 0, block_id, blocks)
        per_block = torch.zeros(movable.shape[0], blocks + 1, dtype=torch.int64,
                                device=movable.device)
        per_block.scatter_add_(1, slot, movable.long())
        masked = per_block[:, self.block_of_step_device]  # (B, steps)
        local = self.local_step
        if self.tokens_per_step is not None:
            done_after = torch.minimum(masked, self.tokens_per_step * (local + 1))
            done_before = torch.minimum(masked, self.tokens_per_step * local)
        else:
            m = masked.double()
            done_after = torch.floor(m * self.frac_after + 0.5).long()
            done_before = torch.floor(m * self.frac_before + 0.5).long()
        counts = (done_after - done_before).clamp(min=0)
        leftover = (per_block[:, :blocks].sum(1) > counts.sum(1)).any()
        return CountPlan(block_id, self.block_of_step, counts, leftover)


def top_per_row(score: torch.Tensor, eligible: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: per row the ``count[b]`` highest-scoring eligible positions of score (B, L)
    (ties: lower position first); fewer when the row has fewer eligible positions. No host
    sync."""
    score = torch.where(eligible, score.double(), float("-inf"))
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    positions = torch.arange(score.shape[1], device=score.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return eligible & (rank < count[:, None])
