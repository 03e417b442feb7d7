"""Triton row passes of the vocabulary-parallel loss, as csrc/shard_rows.h defines them: one
program per row of a logits shard (N, W); the statistics in two passes (maxes, then sums), the
gradient in one. All math in float32."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .loss import _block_config, _chain, _device_guard, _load_logits

_STATS = 6


@triton.jit
def _shift(m):
    # the exps' shift: the max, or 0 while it is -inf (exp(-inf - -inf) would be NaN)
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _off_s(cols, excluded):
    """(BLOCK_V,) True for the columns that are none of the row's excluded ids (BLOCK_K,)."""
    hits = tl.sum((cols[:, None] == excluded[None, :]).to(tl.int32), axis=1)
    return hits == 0


@triton.jit
def _row_stats_kernel(x_ptr, stride_x, t_ptr, stride_t, c_ptr, ex_ptr, stride_ex, out_ptr,
                      n_cols, n_ex, mask_col, temperature, softcap,
                      SOFTCAP: tl.constexpr, TEACHER: tl.constexpr, WEIGHTED: tl.constexpr,
                      REST: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    t_row = t_ptr + row * stride_t
    offs = tl.arange(0, BLOCK_V)
    excluded = tl.full([BLOCK_K], -1, tl.int64)
    if REST:
        k = tl.arange(0, BLOCK_K)
        excluded = tl.load(ex_ptr + row * stride_ex + k, mask=k < n_ex, other=-1)
    m = tl.full([], float("-inf"), tl.float32)
    m2 = tl.full([], float("-inf"), tl.float32)  # teacher max, or the rest's max
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        ok = (cols < n_cols) & (cols != mask_col)
        z, _ = _load_logits(x_row + cols, ok, float("-inf"), softcap, SOFTCAP)
        m = tl.maximum(m, tl.max(z, axis=0))
        if TEACHER:
            u = tl.load(t_row + cols, mask=ok, other=float("-inf")).to(tl.float32) / temperature
            m2 = tl.maximum(m2, tl.max(u, axis=0))
        if REST:
            m2 = tl.maximum(m2, tl.max(tl.where(_off_s(cols, excluded), z, float("-inf")), 0))
    shift = _shift(m)
    shift2 = _shift(m2)
    s = tl.full([], 0.0, tl.float32)
    s2 = tl.full([], 0.0, tl.float32)
    lin = tl.full([], 0.0, tl.float32)
    gap = tl.full([], 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        ok = (cols < n_cols) & (cols != mask_col)
        z, _ = _load_logits(x_row + cols, ok, float("-inf"), softcap, SOFTCAP)
        e = tl.exp(z - shift)
        s += tl.sum(e, axis=0)
        if TEACHER:
            u = tl.load(t_row + cols, mask=ok, other=float("-inf")).to(tl.float32) / temperature
            eu = tl.exp(u - shift2)
            s2 += tl.sum(eu, axis=0)
            # sum q (u - z) unnormalised; a term with q = 0 counts 0 (0 log 0)
            lin += tl.sum(tl.where(eu > 0, eu * (u - z), 0.0), axis=0)
            gap += tl.sum(tl.where(ok, u - z, 0.0), axis=0)
        else:
            c = tl.full([BLOCK_V], 1.0, tl.float32)
            if WEIGHTED:
                c = tl.load(c_ptr + cols, mask=ok, other=0.0)
            lin += tl.sum(tl.where(ok, c * (z - shift), 0.0), axis=0)
            if REST:
                s2 += tl.sum(tl.where(_off_s(cols, excluded), tl.exp(z - shift2), 0.0), axis=0)
    out = out_ptr + row * 6
    tl.store(out, m)
    tl.store(out + 1, s)
    if TEACHER:
        tl.store(out + 2, m2)
        tl.store(out + 3, s2)
        tl.store(out + 4, lin)
        tl.store(out + 5, gap)
    else:
        tl.store(out + 2, lin)
        tl.store(out + 3, m2 if REST else m)
        tl.store(out + 4, s2 if REST else s)
        tl.store(out + 5, 0.0)


@triton.jit
def _ratio_sums_kernel(x_ptr, stride_x, t_ptr, stride_t, delta_ptr, out_ptr, n_cols, mask_col,
                       temperature, softcap, max_log_ratio, SOFTCAP: tl.constexpr,
                       BLOCK_V: tl.constexpr):
    # sum_k exp(min(u_k - z_k - delta, M)) over the participating columns
    row = tl.program_id(0).to(tl.int64)
    delta = tl.load(delta_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    total = tl.full([], 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        ok = (cols < n_cols) & (cols != mask_col)
        z, _ = _load_logits(x_ptr + row * stride_x + cols, ok, 0.0, softcap, SOFTCAP)
        u = tl.load(t_ptr + row * stride_t + cols, mask=ok, other=0.0).to(tl.float32) / temperature
        total += tl.sum(tl.where(ok, tl.exp(tl.minimum(u - z - delta, max_log_ratio)), 0.0), 0)
    tl.store(out_ptr + row, total)


@triton.jit
def _row_grad_kernel(x_ptr, stride_x, t_ptr, stride_t, c_ptr, ex_ptr, stride_ex, lse_ptr,
                     alpha_ptr, beta_ptr, tlse_ptr, gamma_ptr, rlse_ptr, eta_ptr, delta_ptr,
                     kappa_ptr, g_ptr, stride_g, n_cols, n_ex, mask_col, temperature, softcap,
                     max_log_ratio, SOFTCAP: tl.constexpr, TEACHER: tl.constexpr,
                     WEIGHTED: tl.constexpr, REST: tl.constexpr, RATIO: tl.constexpr,
                     BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    g_row = g_ptr + row * stride_g
    lse = tl.load(lse_ptr + row)
    alpha = tl.load(alpha_ptr + row)
    beta = tl.load(beta_ptr + row)
    t_lse = 0.0
    if TEACHER:
        t_lse = tl.load(tlse_ptr + row)
    gamma = 0.0
    rest_lse = 0.0
    excluded = tl.full([BLOCK_K], -1, tl.int64)
    if REST:
        gamma = tl.load(gamma_ptr + row)
        rest_lse = tl.load(rlse_ptr + row)
        k = tl.arange(0, BLOCK_K)
        excluded = tl.load(ex_ptr + row * stride_ex + k, mask=k < n_ex, other=-1)
    eta = 0.0
    delta = 0.0
    kappa = 0.0
    if RATIO:
        eta = tl.load(eta_ptr + row)
        delta = tl.load(delta_ptr + row)
        kappa = tl.load(kappa_ptr + row)
    # a row without loss (all coefficients 0) gets zeros, whatever its LSE (-inf if banned)
    carries = (alpha != 0.0) | (beta != 0.0) | (gamma != 0.0) | (eta != 0.0) | (kappa != 0.0)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        inside = cols < n_cols
        ok = inside & (cols != mask_col)
        z, slope = _load_logits(x_row + cols, ok, float("-inf"), softcap, SOFTCAP)
        # grad = alpha p + beta c (+ gamma exp(z - LSE_R) off S), c = q, the weight or 1
        if TEACHER:
            u = tl.load(t_ptr + row * stride_t + cols, mask=ok,
                        other=float("-inf")).to(tl.float32) / temperature
            c = tl.exp(u - t_lse)
            ratio = tl.exp(tl.minimum(u - z - delta, max_log_ratio))
        elif WEIGHTED:
            c = tl.load(c_ptr + cols, mask=ok, other=0.0)
        else:
            c = tl.full([BLOCK_V], 1.0, tl.float32)
        g = alpha * tl.exp(z - lse) + beta * c
        if REST:
            g += tl.where(_off_s(cols, excluded), gamma * tl.exp(z - rest_lse), 0.0)
        if RATIO:
            g += eta * ratio + kappa
        g = tl.where(ok, _chain(g, slope, SOFTCAP), 0.0)
        g = tl.where(carries, g, 0.0)
        tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=inside)


def _rows(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None or t.shape[1] <= 1 or t.stride(1) == 1:
        return t
    return t.contiguous()


def _launch_args(x: torch.Tensor, teacher: Optional[torch.Tensor],
                 excluded: Optional[torch.Tensor], fallback: torch.Tensor):
    """The row tensors' kernel arguments: (teacher or a stand-in, its row stride, the excluded
    ids or a stand-in, their row stride, K, BLOCK_K); absent tensors point at ``fallback``."""
    n_ex = 0 if excluded is None else excluded.shape[1]
    ex = excluded.contiguous() if excluded is not None else x.new_zeros(1, dtype=torch.int64)
    return (teacher if teacher is not None else fallback,
            teacher.stride(0) if teacher is not None else 0, ex, ex.stride(0) if n_ex else 0,
            n_ex, max(2, triton.next_power_of_2(max(n_ex, 1))))


def row_stats(logits: torch.Tensor, teacher: Optional[torch.Tensor],
              column: Optional[torch.Tensor], excluded: Optional[torch.Tensor], mask_col: int,
              temperature: float, softcap: float) -> torch.Tensor:
    """(N, 6) float32 statistics of the shard's rows (csrc/shard_rows.h)."""
    x, teacher = _rows(logits), _rows(teacher)
    n, w = x.shape
    out = torch.empty((n, _STATS), device=x.device, dtype=torch.float32)
    if n == 0:
        return out
    block_v, warps = _block_config(w, x.device)
    t, stride_t, ex, stride_ex, n_ex, block_k = _launch_args(x, teacher, excluded, x)
    with _device_guard(x.device):
        _row_stats_kernel[(n,)](
            x, x.stride(0), t, stride_t, column if column is not None else out, ex, stride_ex,
            out, w, n_ex, mask_col, temperature, softcap,
            SOFTCAP=softcap > 0, TEACHER=teacher is not None, WEIGHTED=column is not None,
            REST=excluded is not None, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=warps)
    return out


def row_grad(logits: torch.Tensor, teacher: Optional[torch.Tensor],
             column: Optional[torch.Tensor], excluded: Optional[torch.Tensor],
             lse: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
             teacher_lse: Optional[torch.Tensor], gamma: Optional[torch.Tensor],
             rest_lse: Optional[torch.Tensor], eta: Optional[torch.Tensor],
             delta: Optional[torch.Tensor], kappa: Optional[torch.Tensor], out: torch.Tensor,
             mask_col: int, temperature: float, softcap: float, max_log_ratio: float) -> None:
    """out (N, W) = the shard's gradient (csrc/shard_rows.h); out may be logits."""
    x, teacher = _rows(logits), _rows(teacher)
    n, w = x.shape
    if n == 0 or w == 0:
        return
    block_v, warps = _block_config(w, x.device)
    t, stride_t, ex, stride_ex, n_ex, block_k = _launch_args(x, teacher, excluded, x)
    rows = [r if r is not None else lse for r in (column, lse, alpha, beta, teacher_lse, gamma,
                                                   rest_lse, eta, delta, kappa)]
    with _device_guard(x.device):
        _row_grad_kernel[(n,)](
            x, x.stride(0), t, stride_t, rows[0], ex, stride_ex, *rows[1:], out, out.stride(0),
            w, n_ex, mask_col, temperature, softcap, max_log_ratio,
            SOFTCAP=softcap > 0, TEACHER=teacher is not None, WEIGHTED=column is not None,
            REST=excluded is not None, RATIO=eta is not None, BLOCK_V=block_v,
            BLOCK_K=block_k, num_warps=warps)


def ratio_sums(logits: torch.Tensor, teacher: torch.Tensor, delta: torch.Tensor, mask_col: int,
               temperature: float, softcap: float, max_log_ratio: float) -> torch.Tensor:
    """(N,) float32 sums of the clamped ratios exp(min(u - z - delta, M)) (csrc/shard_rows.h)."""
    x, teacher = _rows(logits), _rows(teacher)
    n, w = x.shape
    out = torch.zeros(n, device=x.device, dtype=torch.float32)
    if n == 0 or w == 0:
        return out
    block_v, warps = _block_config(w, x.device)
    with _device_guard(x.device):
        _ratio_sums_kernel[(n,)](x, x.stride(0), teacher, teacher.stride(0), delta, out, w,
                                 mask_col, temperature, softcap, max_log_ratio,
                                 SOFTCAP=softcap > 0, BLOCK_V=block_v, num_warps=warps)
    return out
