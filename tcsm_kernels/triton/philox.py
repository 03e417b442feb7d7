"""Philox-4x32-10 in Triton, word for word the generator of ``tcsm_kernels/philox.py`` (math.md 7).

Key (seed_lo, seed_hi), counter (row_lo, row_hi, offset_lo, offset_hi); word 0 drives the draw
of x1, word 1 the jump decision; a word w becomes the uniform (w + 0.5) * 2**-32 in float64.
Written out with ``tl.umulhi`` and uint32 arithmetic (which wraps modulo 2**32) so the counter
layout is ours, not ``tl.randint``'s.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import philox as _philox


MULT_0 = tl.constexpr(_philox.MULT_0)
MULT_1 = tl.constexpr(_philox.MULT_1)
WEYL_0 = tl.constexpr(_philox.WEYL_0)
WEYL_1 = tl.constexpr(_philox.WEYL_1)
ROUNDS = tl.constexpr(_philox.ROUNDS)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 counter words (c0..c3) under the uint32 key (k0, k1)."""
    mult0 = tl.full((), MULT_0, tl.uint32)
    mult1 = tl.full((), MULT_1, tl.uint32)
    weyl0 = tl.full((), WEYL_0, tl.uint32)
    weyl1 = tl.full((), WEYL_1, tl.uint32)
    for _ in tl.static_range(ROUNDS):
        hi0 = tl.umulhi(c0, mult0)
        lo0 = c0 * mult0
        hi1 = tl.umulhi(c2, mult1)
        lo1 = c2 * mult1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + weyl0
        k1 = k1 + weyl1
    return c0, c1, c2, c3


@triton.jit
def row_words(row, seed_lo, seed_hi, offset_lo, offset_hi):
    """The four words of one row: ``row`` an int64 scalar, the other arguments 32-bit halves."""
    return philox4x32_10(row.to(tl.uint32), (row >> 32).to(tl.uint32),
                         offset_lo.to(tl.uint32), offset_hi.to(tl.uint32),
                         seed_lo.to(tl.uint32), seed_hi.to(tl.uint32))


@triton.jit
def word_uniform(word):
    """(w + 0.5) * 2**-32 as float64: exact, strictly inside (0, 1)."""
    return (word.to(tl.float64) + 0.5) * 2.3283064365386962890625e-10


def split_u64(value: int):
    """(low, high) 32-bit halves of a non-negative Python int below 2**64."""
    return value & _philox.MASK32, (value >> 32) & _philox.MASK32


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "offset_lo", "offset_hi"])
def _row_words_kernel(out_ptr, seed_lo, seed_hi, offset_lo, offset_hi):
    row = tl.program_id(0).to(tl.int64)
    w0, w1, w2, w3 = row_words(row, seed_lo, seed_hi, offset_lo, offset_hi)
    tl.store(out_ptr + row * 4 + 0, w0.to(tl.int64))
    tl.store(out_ptr + row * 4 + 1, w1.to(tl.int64))
    tl.store(out_ptr + row * 4 + 2, w2.to(tl.int64))
    tl.store(out_ptr + row * 4 + 3, w3.to(tl.int64))


def philox_row_words(seed: int, offset: int, rows: int, device) -> torch.Tensor:
    """(rows, 4) int64 holding the uint32 words of each row, for testing against the reference."""
    out = torch.empty((rows, 4), dtype=torch.int64, device=device)
    if rows:
        _row_words_kernel[(rows,)](out, *split_u64(seed), *split_u64(offset))
    return out
