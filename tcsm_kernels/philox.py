"""Philox-4x32-10, the counter-based generator every backend shares (docs/math.md 7).

One call per row: key = (seed_lo, seed_hi), counter = (row_lo, row_hi, offset_lo, offset_hi).
Word 0 drives the categorical draw of x1, word 1 the jump decision (its own stream). A 32-bit
word w becomes the uniform ``(w + 0.5) * 2**-32`` in float64, which lies strictly inside (0, 1)
and is exact, so the C++ and Triton backends reproduce it bit for bit.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch

Seed = Union[int, torch.Tensor]

MULT_0 = 0xD2511F53
MULT_1 = 0xCD9E8D57
WEYL_0 = 0x9E3779B9
WEYL_1 = 0xBB67AE85
ROUNDS = 10
MASK32 = 0xFFFFFFFF
X1_WORD = 0
JUMP_WORD = 1


def _mulhilo(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    # int64 products wrap modulo 2**64, so the low and high 32-bit halves come out exact.
    prod = b * a
    return (prod >> 32) & MASK32, prod & MASK32


def philox4x32(seed: Seed, counters: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, ...]:
    """Four int64 tensors holding uint32 words, from four uint32 counter tensors (int64); the
    seed an int or a one-element int64 tensor on the counters' device (no host read)."""
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(())
    c0, c1, c2, c3 = counters
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(MULT_0, c0)
        hi1, lo1 = _mulhilo(MULT_1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + WEYL_0) & MASK32, (k1 + WEYL_1) & MASK32
    return c0, c1, c2, c3


def row_uniforms(seed: Seed, offset: int, rows: int,
                 device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(u_x1, u_jump), each (rows,) float64 in (0, 1), keyed by (seed, offset, row); ``seed`` an
    int or a one-element int64 tensor on ``device``."""
    row = torch.arange(rows, dtype=torch.int64, device=device)
    zeros = torch.zeros_like(row)
    words = philox4x32(seed, (row & MASK32, (row >> 32) & MASK32,
                              zeros + (offset & MASK32), zeros + ((offset >> 32) & MASK32)))
    scale = 2.0 ** -32
    return ((words[X1_WORD].double() + 0.5) * scale, (words[JUMP_WORD].double() + 0.5) * scale)
