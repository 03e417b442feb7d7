"""Top-k concrete scores in Triton (docs/math.md 6): one program per row, one streaming pass over V.

Order. Each column gets an int64 rank whose order is the output order: the high 32 bits are an
order-preserving signed-integer image of the logit (the "key"; -0 folded into +0, every NaN into
one NaN above +inf, as torch.sort orders them), the low 32 bits 2^32 - 1 - column, so equal
logits rank the lower column first (math.md 6 ties). Ranks are distinct, so "top k" is exact.

Running top-k (the choice made here: simple and exact, not a radix select). The program keeps
the K_PAD best ranks seen so far (K_PAD = next power of two >= k), sorted best first, and the
rank of the k-th best as a threshold. Per block of BLOCK >= K_PAD columns: if the block's best
rank does not beat the threshold, nothing in it can enter the top k and the block costs only its
LSE update; otherwise ``tl.topk`` takes the block's K_PAD best, and
max(kept (descending), block best (ascending)) elementwise is a bitonic sequence holding the
K_PAD best of both, which one bitonic merge sorts. k above MAX_K runs a stable torch sort
instead (that many candidates would not fit a program's registers).

LSE. Online over blocks: with running max M and mass S = sum_v exp((u_v - M) / tau), a block
with larger max M' rescales S by exp((M - M') / tau); LSE = M / tau + log S.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))
CANONICAL_NAN_BITS = tl.constexpr(0x7FC00000)
MAGNITUDE_BITS = tl.constexpr(0x7FFFFFFF)
LOWEST_KEY = tl.constexpr(-(2**31))  # below every logit's key: padding lanes and empty slots
LAST_COLUMN = tl.constexpr(2**32 - 1)
MAX_K = 1024


@triton.jit
def _column_ranks(u, cols, inside):
    """int64 ranks of the logits u at columns cols (see the module docstring)."""
    folded = u + 0.0  # -0 + 0 = +0
    bits = tl.where(folded != folded, CANONICAL_NAN_BITS, folded.to(tl.int32, bitcast=True))
    key = bits ^ ((bits >> 31) & MAGNITUDE_BITS)
    key = tl.where(inside, key, LOWEST_KEY)
    return (key.to(tl.int64) << 32) | (LAST_COLUMN - cols.to(tl.int64))


@triton.jit
def _topk_scores_kernel(logits_ptr, row_stride, target_ptr, indices_ptr, log_ratios_ptr, lse_ptr,
                        vocab, k, temperature, BLOCK: tl.constexpr, K_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    lanes = tl.arange(0, BLOCK)
    slots = tl.arange(0, K_PAD)
    inv_temp = 1.0 / temperature

    lowest_rank = tl.full((), LOWEST_KEY, tl.int64) << 32
    kept = tl.full((K_PAD,), LOWEST_KEY, tl.int64) << 32  # best first
    threshold = lowest_rank  # rank of the k-th best so far
    running_max = tl.full((), NEG_INF, tl.float32)
    mass = tl.zeros((), tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + lanes
        inside = cols < vocab
        u = tl.load(row_ptr + cols, mask=inside, other=NEG_INF).to(tl.float32)

        # Online LSE. While every logit seen is -inf, exponents are taken against 0 (all
        # weights 0) and S = 0 needs no rescaling.
        new_max = tl.maximum(running_max, tl.max(u, axis=0))
        pivot = tl.where(new_max == NEG_INF, 0.0, new_max)
        rescale = tl.exp(tl.where(running_max == NEG_INF, 0.0, (running_max - pivot) * inv_temp))
        mass = mass * rescale + tl.sum(tl.exp((u - pivot) * inv_temp), axis=0)
        running_max = new_max

        ranks = _column_ranks(u, cols, inside)
        if tl.max(ranks, axis=0) > threshold:
            block_best = tl.topk(ranks, K_PAD)
            kept = tl.bitonic_merge(tl.maximum(kept, tl.flip(block_best)), descending=True)
            threshold = tl.max(tl.where(slots == k - 1, kept, lowest_rank), axis=0)

    # Outputs (math.md 6): log-ratios (u_y - u_a) / tau; an unchecked target outside [0, V) has no
    # u_a and gives NaN.
    columns = LAST_COLUMN - (kept - ((kept >> 32) << 32))
    chosen = slots < k
    u_best = tl.load(row_ptr + columns, mask=chosen, other=0.0).to(tl.float32)
    target = tl.load(target_ptr + row)
    has_target = (target >= 0) & (target < vocab)
    u_target = tl.load(row_ptr + target, mask=has_target, other=float("nan")).to(tl.float32)
    tl.store(indices_ptr + row * k + slots, columns, mask=chosen)
    tl.store(log_ratios_ptr + row * k + slots, (u_best - u_target) / temperature, mask=chosen)
    tl.store(lse_ptr + row, running_max / temperature + tl.log(mass))


def launch_sizes(vocab: int, k: int):
    """(K_PAD, BLOCK): candidates kept per row, and columns per block (at least K_PAD, the row in
    one block up to 2048 columns)."""
    k_pad = max(triton.next_power_of_2(k), 16)
    return k_pad, max(k_pad, min(triton.next_power_of_2(vocab), 2048))


def topk_scores(teacher_logits: torch.Tensor, target: torch.Tensor, k: int, temperature: float):
    """Flat rows: teacher_logits (N, V) with unit column stride, target (N,) int64. Returns
    indices (N, k) int64, log-ratios (N, k) float32, LSE (N,) float32."""
    rows, vocab = teacher_logits.shape
    if k > MAX_K:
        return _topk_scores_by_sort(teacher_logits, target, k, temperature)
    indices = torch.empty(rows, k, dtype=torch.int64, device=teacher_logits.device)
    log_ratios = torch.empty(rows, k, dtype=torch.float32, device=teacher_logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=teacher_logits.device)
    if rows:
        k_pad, block = launch_sizes(vocab, k)
        _topk_scores_kernel[(rows,)](
            teacher_logits, teacher_logits.stride(0), target, indices, log_ratios, lse,
            vocab, k, float(temperature), BLOCK=block, K_PAD=k_pad,
            num_warps=4 if block <= 1024 else 8)
    return indices, log_ratios, lse


def _topk_scores_by_sort(teacher_logits, target, k, temperature):
    """k > MAX_K: the same results from a stable descending sort (ties: lower index first)."""
    u = teacher_logits.float()
    indices = torch.sort(u, dim=1, descending=True, stable=True).indices[:, :k]
    vocab = u.shape[1]
    has_target = (target >= 0) & (target < vocab)
    u_target = u.gather(1, target.clamp(0, vocab - 1)[:, None])
    u_target = torch.where(has_target[:, None], u_target, torch.nan)
    log_ratios = (u.gather(1, indices) - u_target) / temperature
    return indices, log_ratios, torch.logsumexp(u / temperature, dim=1)
