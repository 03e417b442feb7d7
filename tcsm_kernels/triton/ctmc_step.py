"""Fused CTMC reverse step in Triton (docs/math.md 7, "inverse CDF over blocks"): one program
per row.

With s_v = z_v / T over participating columns (the mask column and the masked tail load as -inf,
weight 0) and M = max_v z_v:
  pass 1 streams the row once, BLOCK columns at a time, with an online max: the total
  Z = sum_v exp((z_v - M) / T) and E = sum_v exp((z_v - M) / T) (z_v - M) / T are rescaled
  whenever the running max m rises to m': Z' = e^d Z, E' = e^d (E + d Z), d = (m - m') / T.
  Each lane also keeps the two largest logits it has seen (for the top-2 probability).
  pass 2 walks the blocks again with the final M, float32 weights and float64 running sums,
  and stops at the first block whose cumulative mass exceeds target = u Z (u: the row's Philox
  uniform); a float64 cumulative sum inside that block picks the first column that crosses.
Z from pass 1 and the sums of pass 2 agree to float32 rounding. If pass 2 ends below the target,
the last block of positive mass is taken and inside it the last column of positive weight, so
the mask column (weight 0) and columns past V are never drawn.
Outputs: p(x1) = exp((z_x1 - M) / T) / Z, margin = (1 - exp((z_top2 - M) / T)) / Z,
entropy H = log Z - E / Z.

Tokens depend only on (seed, offset, row) and the logits, up to float32 rounding of the block
sums, whose order follows BLOCK: a different BLOCK can change a token only where u Z lies within
rounding of a CDF boundary.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import philox

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _participating_logits(row_ptr, cols, vocab, mask_id):
    """Logits of ``cols`` as float32; the mask column and columns outside [0, V) are -inf."""
    inside = (cols >= 0) & (cols < vocab)
    z = tl.load(row_ptr + cols, mask=inside, other=NEG_INF).to(tl.float32)
    return tl.where(cols == mask_id, NEG_INF, z)


@triton.jit(do_not_specialize=["mask_id", "seed_lo", "seed_hi", "offset_lo", "offset_hi"])
def _ctmc_step_kernel(logits_ptr, row_stride, x_ptr, jump_ptr, frozen_ptr,
                      x_next_ptr, x1_ptr, prob_ptr, margin_ptr, entropy_ptr,
                      vocab, mask_id, inv_temp, seed_ptr, seed_lo, seed_hi, offset_lo, offset_hi,
                      HAS_FROZEN: tl.constexpr, SEED_FROM_TENSOR: tl.constexpr,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if SEED_FROM_TENSOR:  # read at launch: a replayed CUDA graph sees the current seed
        seed = tl.load(seed_ptr)
        seed_lo = seed & 0xFFFFFFFF
        seed_hi = (seed >> 32) & 0xFFFFFFFF
    row_ptr = logits_ptr + row * row_stride
    lanes = tl.arange(0, BLOCK)

    # Pass 1: online max, total mass Z and E (see the module docstring), per-lane top-2 logits.
    running_max = tl.full((), NEG_INF, tl.float32)
    total = tl.zeros((), tl.float64)
    shifted = tl.zeros((), tl.float64)
    lane_top1 = tl.full((BLOCK,), NEG_INF, tl.float32)
    lane_top2 = tl.full((BLOCK,), NEG_INF, tl.float32)
    for start in range(0, vocab, BLOCK):
        z = _participating_logits(row_ptr, start + lanes, vocab, mask_id)
        lane_top2 = tl.maximum(lane_top2, tl.minimum(lane_top1, z))
        lane_top1 = tl.maximum(lane_top1, z)
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        # While nothing finite has been seen, exponents are taken against 0 (all weights are 0)
        # and Z = E = 0 need no rescaling (d = 0 keeps -inf out of the arithmetic).
        pivot = tl.where(new_max == NEG_INF, 0.0, new_max)
        exponent = (z - pivot) * inv_temp
        weight = tl.exp(exponent)
        # Columns of weight 0 add nothing to E (0 * -inf would be NaN).
        block_shifted = tl.sum(weight * tl.where(weight > 0, exponent, 0.0), axis=0)
        rise = tl.where(running_max == NEG_INF, 0.0, (running_max - pivot) * inv_temp)
        rise = rise.to(tl.float64)
        decay = tl.exp(rise)
        shifted = decay * (shifted + rise * total) + block_shifted.to(tl.float64)
        total = decay * total + tl.sum(weight, axis=0).to(tl.float64)
        running_max = new_max

    row_max = running_max
    top2 = tl.max(lane_top2, axis=0)
    top1_lane = tl.argmax(lane_top1, axis=0)
    top2 = tl.maximum(top2, tl.max(tl.where(lanes == top1_lane, NEG_INF, lane_top1), axis=0))

    draw_word, jump_word, _, _ = philox.row_words(row, seed_lo, seed_hi, offset_lo, offset_hi)
    target = philox.word_uniform(draw_word) * total

    # Pass 2: blocks until the cumulative mass first exceeds the target.
    below = tl.zeros((), tl.float64)
    start = tl.zeros((), tl.int32)
    crossed = start != 0
    last_positive_block = start - 1
    while (start < vocab) & (crossed == 0):
        z = _participating_logits(row_ptr, start + lanes, vocab, mask_id)
        block_mass = tl.sum(tl.exp((z - row_max) * inv_temp).to(tl.float64), axis=0)
        crossed = below + block_mass > target
        last_positive_block = tl.where(block_mass > 0, start, last_positive_block)
        below = tl.where(crossed, below, below + block_mass)
        start = tl.where(crossed, start, start + BLOCK)

    # Inside the chosen block: first column of positive weight whose cumulative mass exceeds
    # the target, else (rounding) the block's last column of positive weight.
    block_start = tl.where(crossed, start, last_positive_block)
    cols = block_start + lanes
    weight = tl.exp((_participating_logits(row_ptr, cols, vocab, mask_id) - row_max) * inv_temp)
    cumulative = below + tl.cumsum(weight.to(tl.float64), axis=0)
    # (The scalar flag `crossed` enters only scalar expressions: the Triton interpreter mistypes
    # a scalar float comparison broadcast against a block.)
    crossing = (cumulative > target) & (weight > 0)
    first_crossing = tl.min(tl.where(crossing, cols, vocab), axis=0)
    last_positive = tl.max(tl.where(weight > 0, cols, -1), axis=0)
    x1 = tl.where(crossed & (first_crossing < vocab), first_crossing, last_positive)
    # Only non-finite logits leave no column of positive weight: the first participating one.
    x1 = tl.where(x1 >= 0, x1, tl.where(mask_id == 0, 1, 0))
    x1_weight = tl.sum(tl.where(cols == x1, weight, 0.0), axis=0)

    tl.store(x1_ptr + row, x1.to(tl.int64))
    tl.store(prob_ptr + row, (x1_weight.to(tl.float64) / total).to(tl.float32))
    top2_weight = tl.exp((top2 - row_max) * inv_temp).to(tl.float64)
    tl.store(margin_ptr + row, ((1.0 - top2_weight) / total).to(tl.float32))
    tl.store(entropy_ptr + row, (tl.log(total) - shifted / total).to(tl.float32))

    # Jump (math.md 7 step 2, own Philox word): masked path moves only rows at mask_id, uniform
    # path any row, never a frozen row; an out-of-range x (possible only unchecked) stays.
    current = tl.load(x_ptr + row)
    may_change = (current >= 0) & (current < vocab) & ((mask_id < 0) | (current == mask_id))
    if HAS_FROZEN:
        may_change = may_change & (tl.load(frozen_ptr + row) == 0)
    jumps = philox.word_uniform(jump_word) < tl.load(jump_ptr + row)
    tl.store(x_next_ptr + row, tl.where(may_change & jumps, x1.to(tl.int64), current))


def default_block(vocab: int) -> int:
    """Columns per block: the row in one block up to 2048 columns, else blocks of 2048."""
    return min(max(triton.next_power_of_2(vocab), 16), 2048)


def ctmc_step(logits, x, jump, frozen, mask_id: int, temperature: float,
              seed: int | torch.Tensor, offset: int, block: int | None = None):
    """Launch over flat rows: logits (N, V) with unit column stride, x (N,) int64, jump (N,)
    float64, frozen (N,) bool or None, seed an int or a one-element int64 tensor on the logits'
    device. Returns (x_next, x1, prob, margin, entropy), all (N,)."""
    seed_from_tensor = isinstance(seed, torch.Tensor)
    rows, vocab = logits.shape
    block = default_block(vocab) if block is None else block
    x_next = torch.empty_like(x)
    x1 = torch.empty_like(x)
    prob, margin, entropy = (torch.empty(rows, dtype=torch.float32, device=logits.device)
                             for _ in range(3))
    if rows:
        _ctmc_step_kernel[(rows,)](
            logits, logits.stride(0), x, jump, x if frozen is None else frozen,
            x_next, x1, prob, margin, entropy,
            vocab, mask_id, 1.0 / temperature, seed if seed_from_tensor else x,
            *philox.split_u64(0 if seed_from_tensor else seed), *philox.split_u64(offset),
            HAS_FROZEN=frozen is not None, SEED_FROM_TENSOR=seed_from_tensor, BLOCK=block,
            num_warps=4 if block <= 1024 else 8)
    return x_next, x1, prob, margin, entropy
