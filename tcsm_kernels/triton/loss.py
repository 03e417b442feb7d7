"""Triton kernels of the TCSM loss (docs/math.md 4-5): per row, the weighted loss and its gradient.

One program per row streams the row in blocks of BLOCK_V columns. Pass 1 builds the row
log-sum-exps with an online max / sum-exp (the student's and, for a dense teacher, the
teacher's); pass 2 writes ``weight * d row_loss / d logits`` and accumulates the sums that need
the final LSEs (the KL term, sum log p, ...). Each target kind (data, dense teacher, sparse
top-K teacher) is one kernel and the divergence, objective, tail and weight are constexpr
flags, so every combination compiles to its own specialised kernel; so are the options
(SOFTCAP, Z_LOSS, RETURN_LSE, SMOOTHING, HAS_CLASS_WEIGHT): off, they add no instruction.

All math runs in float32 whatever the logits dtype. ``grad`` may be the logits tensor itself
(in-place backward): a column is always read before it is written, and the columns that are
read out of order (the target column a, the top-K columns) are gathered before a barrier that
precedes the first store of the row.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..loss_options import LossOptions

_KL = tl.constexpr(0)
_IS = tl.constexpr(1)
_GKL = tl.constexpr(2)
_DIVERGENCE_CODES = {"kl": 0, "is": 1, "gkl": 2}

# Largest column block on a GPU; under the interpreter smaller blocks keep the tests fast and
# still split V = 1000 into several blocks, so the online LSE and the block tails are exercised.
_GPU_BLOCK_V = 4096
_INTERPRETER_BLOCK_V = 256
# K x K matching of duplicate top-K columns runs in (BLOCK_K, CHUNK_K) tiles of at most this
# many elements, so a large K does not blow up the register file.
_MATCH_TILE = 4096


@triton.jit
def _clamped_exp(x, max_log_ratio):
    # math.md 4.6: exp(min(x, M)); its derivative is taken to be the same clamped value, exactly
    # what autograd gives for the reference's _clamped_exp.
    return tl.exp(tl.minimum(x, max_log_ratio))


@triton.jit
def _tanh_and_slope(y):
    """tanh(y) and 1 - tanh^2(y) as the C++ kernel forms them (tanh_and_slope): the odd
    Taylor series to y^17 for |y| < 1/2, else (1 - t) / (1 + t) and 4t / (1 + t)^2 with
    t = exp(-2|y|), which do not cancel where tanh is near 1."""
    y2 = y * y
    series = 6404582.0 / 10854718875.0
    series = series * y2 - 929569.0 / 638512875.0
    series = series * y2 + 21844.0 / 6081075.0
    series = series * y2 - 1382.0 / 155925.0
    series = series * y2 + 62.0 / 2835.0
    series = series * y2 - 17.0 / 315.0
    series = series * y2 + 2.0 / 15.0
    series = series * y2 - 1.0 / 3.0
    near_zero = y * (series * y2 + 1.0)
    t = tl.exp(-2.0 * tl.abs(y))
    far = (1.0 - t) / (1.0 + t)
    small = tl.abs(y) < 0.5
    tanh = tl.where(small, near_zero, tl.where(y < 0, -far, far))
    slope = tl.where(small, 1.0 - near_zero * near_zero, 4.0 * t / ((1.0 + t) * (1.0 + t)))
    return tanh, slope


@triton.jit
def _load_logits(ptrs, mask, other, softcap, SOFTCAP: tl.constexpr):
    """Student logits as the loss sees them, in float32, and d(that) / d(logit): with SOFTCAP
    c tanh(z / c) (Gemma; Liger's and CCE's softcap) and 1 - tanh^2, else z and 1. Entries off
    `mask` are `other` (never capped: a -inf stays -inf)."""
    z = tl.load(ptrs, mask=mask, other=other).to(tl.float32)
    slope = tl.full([], 1.0, tl.float32)
    if SOFTCAP:
        tanh, slope = _tanh_and_slope(z / softcap)
        z = tl.where(mask, softcap * tanh, other)
    return z, slope


@triton.jit
def _chain(grad, slope, SOFTCAP: tl.constexpr):
    """d loss / d logit from d loss / d capped logit (the chain rule through the softcap)."""
    if SOFTCAP:
        grad = grad * slope
    return grad


@triton.jit
def _z_loss(lse, weight, lse_square_scale, Z_LOSS: tl.constexpr):
    """z-loss (PaLM; Liger's lse_square_scale s): (s LSE^2, weight 2 s LSE), the row's loss
    term and its weighted coefficient of p in the gradient (d LSE / dz = p); zeros when off."""
    loss = tl.full([], 0.0, tl.float32)
    p_coef = tl.full([], 0.0, tl.float32)
    if Z_LOSS:
        loss = lse_square_scale * lse * lse
        p_coef = weight * 2.0 * lse_square_scale * lse
    return loss, p_coef


@triton.jit
def _store_row_lse(lse_ptr, row, lse, row_ok, RETURN_LSE: tl.constexpr):
    # The student's row LSE; 0 on rows that are not computed.
    if RETURN_LSE:
        tl.store(lse_ptr + row, tl.where(row_ok, lse, 0.0))


@triton.jit
def _online_lse_step(running_max, running_sum, x):
    """Fold one block x (excluded columns = -inf) into (max, sum exp(x - max)). While the max is
    still -inf (every entry so far is -inf), the exps take shift 0: exp(-inf - -inf) is NaN."""
    new_max = tl.maximum(running_max, tl.max(x, axis=0))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    rescaled = running_sum * tl.exp(running_max - shift)
    return new_max, rescaled + tl.sum(tl.exp(x - shift), axis=0)


@triton.jit
def _row_setup(target_ptr, stride_target, weight_ptr, stride_weight, row, n_cols, mask_id,
               ignore_index, HAS_WEIGHT: tl.constexpr):
    """Target, weight, whether the row carries loss, and whether its target is a valid column.

    Row-level conditions are folded into loop bounds and masks as `cols < where(ok, n, 0)`.
    """
    target = tl.load(target_ptr + row * stride_target).to(tl.int64)
    live = target != ignore_index
    weight = tl.full([], 1.0, tl.float32)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + row * stride_weight).to(tl.float32)
        live = live & (weight != 0.0)
    target_ok = (target >= 0) & (target < n_cols) & (target != mask_id)
    return target, weight, live, target_ok


@triton.jit
def _dense_row_setup(logits_row, teacher_row, target_ptr, stride_target, weight_ptr,
                     stride_weight, row, n_cols, mask_id, ignore_index, temperature, softcap,
                     HAS_WEIGHT: tl.constexpr, SOFTCAP: tl.constexpr):
    """_row_setup for a dense teacher, plus row_ok, the loop bound n_live_cols (0 skips the
    row), z_a (with its softcap slope) and u_a / tau (0 where the row is not computed)."""
    target, weight, live, target_ok = _row_setup(target_ptr, stride_target, weight_ptr,
                                                 stride_weight, row, n_cols, mask_id,
                                                 ignore_index, HAS_WEIGHT)
    row_ok = live & target_ok
    n_live_cols = tl.where(row_ok, n_cols, 0)
    z_a, slope_a = _load_logits(logits_row + target, row_ok, 0.0, softcap, SOFTCAP)
    u_a = tl.load(teacher_row + target, mask=row_ok, other=0.0).to(tl.float32) / temperature
    return target, weight, live, row_ok, n_live_cols, z_a, slope_a, u_a


@triton.jit
def _row_lse(logits_row, n_read, n_cols, mask_id, softcap, SOFTCAP: tl.constexpr,
             BLOCK_V: tl.constexpr):
    """log sum_y exp(z_y) over the participating columns (pass 1); n_read = 0 skips the row."""
    running_max = tl.full([], float("-inf"), tl.float32)
    running_sum = tl.full([], 0.0, tl.float32)
    for start in range(0, n_read, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        participating = (cols < n_cols) & (cols != mask_id)
        z, _ = _load_logits(logits_row + cols, participating, float("-inf"), softcap, SOFTCAP)
        running_max, running_sum = _online_lse_step(running_max, running_sum, z)
    return running_max + tl.log(running_sum)


@triton.jit
def _divergence_loss(kl, is_, DIVERGENCE: tl.constexpr):
    """The row loss of the divergence from its kl and is parts (gkl = kl + is)."""
    if DIVERGENCE == _KL:
        row_loss = kl
    elif DIVERGENCE == _IS:
        row_loss = is_
    else:
        row_loss = kl + is_
    return row_loss


@triton.jit
def _store_row_loss(loss_ptr, row, row_loss, weight, live, row_ok):
    # math.md 5: weight * row loss; 0 on ignored / weight-0 rows; NaN on a live row with a bad id.
    out = tl.where(row_ok, weight * row_loss, tl.where(live, float("nan"), 0.0))
    tl.store(loss_ptr + row, out)


@triton.jit
def _data_target_kernel(
    logits_ptr, grad_ptr, target_ptr, weight_ptr, loss_ptr, lse_ptr, class_weight_ptr,
    class_weight_sum_ptr, stride_logits, stride_grad, stride_target, stride_weight, n_cols,
    n_classes, mask_id, ignore_index, max_log_ratio, softcap, lse_square_scale,
    label_smoothing,
    DIVERGENCE: tl.constexpr, HAS_WEIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    Z_LOSS: tl.constexpr, RETURN_LSE: tl.constexpr, SMOOTHING: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Data target (math.md 4.1): only the clean token a is known; kl, is or gkl. A class weight
    w_a scales the divergence (F.cross_entropy's weight=); SMOOTHING (kl) is torch's label
    smoothing; the z-loss is not class-weighted (as Liger's)."""
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits
    grad_row = grad_ptr + row * stride_grad
    target, weight, live, target_ok = _row_setup(target_ptr, stride_target, weight_ptr,
                                                 stride_weight, row, n_cols, mask_id,
                                                 ignore_index, HAS_WEIGHT)
    row_ok = live & target_ok
    n_live_cols = tl.where(row_ok, n_cols, 0)
    z_a, _ = _load_logits(logits_row + target, row_ok, 0.0, softcap, SOFTCAP)
    lse = _row_lse(logits_row, n_live_cols, n_cols, mask_id, softcap, SOFTCAP, BLOCK_V)
    z_loss, z_p_coef = _z_loss(lse, weight, lse_square_scale, Z_LOSS)
    class_a = tl.full([], 1.0, tl.float32)
    if HAS_CLASS_WEIGHT:
        class_a = tl.load(class_weight_ptr + target, mask=row_ok, other=0.0).to(tl.float32)
    if SMOOTHING:
        # F.cross_entropy(label_smoothing=eps, weight=w): target weight (1 - eps) w_a at a
        # and (eps / V) w_y on every column, W = sum_y w_y (V unweighted):
        # loss c_a (LSE - z_a) - e sum_y w_y log p_y, grad (c_a + e W) p - c_a e_a - e w.
        c_a = (1.0 - label_smoothing) * class_a
        e = label_smoothing / n_classes
        total_weight = n_classes
        if HAS_CLASS_WEIGHT:
            total_weight = tl.load(class_weight_sum_ptr)
        p_slope = c_a + e * total_weight
    # 1/p_a = exp(LSE - z_a), clamped (math.md 4.6); p_k/p_a = exp(log(1/p_a) + log p_k) then
    # stays below exp(M) and equals exp(z_k - z_a) exactly when the clamp is inactive.
    log_inv_pa = tl.minimum(lse - z_a, max_log_ratio)
    inv_pa = tl.exp(log_inv_pa)
    divergence_weight = weight * class_a
    sum_logp = tl.zeros([BLOCK_V], tl.float32)
    tl.debug_barrier()  # z_a is read by every thread before column a can be overwritten
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < n_cols
        participating = (cols < n_live_cols) & (cols != mask_id)
        z, slope = _load_logits(logits_row + cols, participating, 0.0, softcap, SOFTCAP)
        logp = z - lse
        p = tl.exp(logp)
        at_a = cols == target
        if DIVERGENCE == _KL:
            if SMOOTHING:
                column_weight = tl.full([BLOCK_V], 1.0, tl.float32)
                if HAS_CLASS_WEIGHT:
                    column_weight = tl.load(class_weight_ptr + cols, mask=participating,
                                            other=0.0).to(tl.float32)
                sum_logp += tl.where(participating, column_weight * logp, 0.0)
                grad = weight * (p_slope * p - tl.where(at_a, c_a, 0.0) - e * column_weight)
            else:
                # math.md 4.1 kl (masked cross-entropy): d(LSE - z_a)/dz = p - e_a.
                grad = divergence_weight * (p - tl.where(at_a, 1.0, 0.0))
        else:
            sum_logp += tl.where(participating, logp, 0.0)
            ratio = tl.exp(log_inv_pa + logp)
            if DIVERGENCE == _IS:
                # math.md 4.1 is: (exp(LSE - z_a)(p - e_a) + 1 - V p) / V.
                grad = (ratio - tl.where(at_a, inv_pa, 0.0) + 1.0 - n_classes * p) / n_classes
            else:
                # math.md 4.1 gkl = kl + is: 1/V + p/(V p_a) - e_a (1 + 1/(V p_a)).
                grad = (1.0 + ratio - tl.where(at_a, n_classes + inv_pa, 0.0)) / n_classes
            grad = divergence_weight * grad
        if Z_LOSS:
            grad += z_p_coef * p
        grad = _chain(tl.where(participating, grad, 0.0), slope, SOFTCAP)
        tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)

    # math.md 4.1 losses: kl = LSE - z_a; is = (exp(LSE - z_a) + sum_y log p_y) / V, where
    # sum_y log p_y = sum_y z_y - V LSE is summed term by term (no cancellation of large sums).
    kl = lse - z_a
    if SMOOTHING:
        row_loss = c_a * kl - e * tl.sum(sum_logp, axis=0)
    else:
        is_ = (inv_pa + tl.sum(sum_logp, axis=0)) / n_classes
        row_loss = class_a * _divergence_loss(kl, is_, DIVERGENCE)
    _store_row_loss(loss_ptr, row, row_loss + z_loss, weight, live, row_ok)
    _store_row_lse(lse_ptr, row, lse, row_ok, RETURN_LSE)


@triton.jit
def _dense_target_kernel(
    logits_ptr, teacher_ptr, grad_ptr, target_ptr, weight_ptr, loss_ptr, lse_ptr,
    stride_logits, stride_teacher, stride_grad, stride_target, stride_weight, n_cols,
    n_classes, mask_id, ignore_index, temperature, max_log_ratio, softcap, lse_square_scale,
    DIVERGENCE: tl.constexpr, SCORE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, Z_LOSS: tl.constexpr, RETURN_LSE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Dense teacher q = softmax(u / tau): objective distrib (kl, is, gkl) or score (gkl)."""
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits
    teacher_row = teacher_ptr + row * stride_teacher
    grad_row = grad_ptr + row * stride_grad
    target, weight, live, row_ok, n_live_cols, z_a, _, u_a = _dense_row_setup(
        logits_row, teacher_row, target_ptr, stride_target, weight_ptr, stride_weight, row,
        n_cols, mask_id, ignore_index, temperature, softcap, HAS_WEIGHT, SOFTCAP)

    # Pass 1: LSE of z and of u / tau; for distrib is/gkl also the LSE of d = u / tau - z,
    # which gives S = sum_y q_y / p_y = exp(LSE(d) + LSE_z - LSE_u) before pass 2 needs it.
    z_max = tl.full([], float("-inf"), tl.float32)
    z_sum = tl.full([], 0.0, tl.float32)
    u_max = tl.full([], float("-inf"), tl.float32)
    u_sum = tl.full([], 0.0, tl.float32)
    d_max = tl.full([], float("-inf"), tl.float32)
    d_sum = tl.full([], 0.0, tl.float32)
    for start in range(0, n_live_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        participating = (cols < n_cols) & (cols != mask_id)
        z, _ = _load_logits(logits_row + cols, participating, float("-inf"), softcap, SOFTCAP)
        u = tl.load(teacher_row + cols, mask=participating,
                    other=float("-inf")).to(tl.float32) / temperature
        z_max, z_sum = _online_lse_step(z_max, z_sum, z)
        u_max, u_sum = _online_lse_step(u_max, u_sum, u)
        if not SCORE:
            if DIVERGENCE != _KL:
                d = tl.where(participating, u - z, float("-inf"))
                d_max, d_sum = _online_lse_step(d_max, d_sum, d)
    lse_z = z_max + tl.log(z_sum)
    lse_u = u_max + tl.log(u_sum)

    if not SCORE:
        if DIVERGENCE != _KL:
            # math.md 4.2 is needs the clamped S = sum_y exp(min(r_y, M)), r_y = log q_y - log p_y.
            # The largest r_y is max(d) + LSE_z - LSE_u: only when it exceeds M does S need a
            # pass of its own.
            lse_shift = lse_z - lse_u
            ratio_sum = tl.exp(d_max + tl.log(d_sum) + lse_shift)
            clamp_active = (d_max + lse_shift > max_log_ratio) & row_ok
            clamped_terms = tl.zeros([BLOCK_V], tl.float32)
            for start in range(0, tl.where(clamp_active, n_cols, 0), BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                participating = (cols < n_cols) & (cols != mask_id)
                z, _ = _load_logits(logits_row + cols, participating, 0.0, softcap, SOFTCAP)
                logp = z - lse_z
                logq = tl.load(teacher_row + cols, mask=participating,
                               other=0.0).to(tl.float32) / temperature - lse_u
                ratio = _clamped_exp(logq - logp, max_log_ratio)
                clamped_terms += tl.where(participating, ratio, 0.0)
            ratio_sum = tl.where(clamp_active, tl.sum(clamped_terms, axis=0), ratio_sum)

    # Score objective (math.md 4.3): clamped 1/p_a and 1/q_a.
    log_inv_pa = tl.minimum(lse_z - z_a, max_log_ratio)
    log_inv_qa = tl.minimum(lse_u - u_a, max_log_ratio)
    inv_pa = tl.exp(log_inv_pa)
    inv_qa = tl.exp(log_inv_qa)
    z_loss, z_p_coef = _z_loss(lse_z, weight, lse_square_scale, Z_LOSS)

    kl_terms = tl.zeros([BLOCK_V], tl.float32)
    is_terms = tl.zeros([BLOCK_V], tl.float32)
    tl.debug_barrier()  # z_a is read by every thread before column a can be overwritten
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < n_cols
        participating = (cols < n_live_cols) & (cols != mask_id)
        z, slope = _load_logits(logits_row + cols, participating, 0.0, softcap, SOFTCAP)
        logp = z - lse_z
        logq = tl.load(teacher_row + cols, mask=participating,
                       other=0.0).to(tl.float32) / temperature - lse_u
        p = tl.exp(logp)
        q = tl.exp(logq)
        log_ratio = logq - logp
        if DIVERGENCE != _IS:
            # 0 log 0 = 0: a teacher probability of 0 (u = -inf) adds nothing to the KL.
            kl_terms += tl.where(participating & (q > 0), q * log_ratio, 0.0)
        if SCORE:
            # math.md 4.3 gkl: (1/V)[(e_a - q)/q_a - (e_a - p)/p_a], with q_k/q_a and p_k/p_a
            # formed as exp(log(1/q_a) + log q_k) so that the clamp applies to both.
            at_a = cols == target
            grad = (tl.exp(log_inv_pa + logp) - tl.exp(log_inv_qa + logq)
                    + tl.where(at_a, inv_qa - inv_pa, 0.0)) / n_classes
        else:
            # math.md 4.2: kl gradient p - q; is gradient (1/V)(1 - q/p + p (S - V)).
            if DIVERGENCE == _KL:
                grad = p - q
            else:
                ratio = _clamped_exp(log_ratio, max_log_ratio)
                is_terms += tl.where(participating, ratio - log_ratio - 1.0, 0.0)
                grad = (1.0 - ratio + p * (ratio_sum - n_classes)) / n_classes
                if DIVERGENCE == _GKL:
                    grad += p - q
        grad = weight * grad
        if Z_LOSS:
            grad += z_p_coef * p
        grad = _chain(tl.where(participating, grad, 0.0), slope, SOFTCAP)
        tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)

    kl = tl.sum(kl_terms, axis=0)
    if SCORE:
        # math.md 4.3 gkl: (1/V)[(KL(q||p) - log q_a + log p_a)/q_a - 1/q_a + 1/p_a].
        log_qa = u_a - lse_u
        log_pa = z_a - lse_z
        row_loss = ((kl - log_qa + log_pa) * inv_qa - inv_qa + inv_pa) / n_classes
    else:
        # math.md 4.2: kl = sum q log(q/p); is = (1/V) sum [q/p - log(q/p) - 1]; gkl = kl + is.
        is_ = tl.sum(is_terms, axis=0) / n_classes
        row_loss = _divergence_loss(kl, is_, DIVERGENCE)
    _store_row_loss(loss_ptr, row, row_loss + z_loss, weight, live, row_ok)
    _store_row_lse(lse_ptr, row, lse_z, row_ok, RETURN_LSE)


@triton.jit
def _dense_score_is_kernel(
    logits_ptr, teacher_ptr, grad_ptr, target_ptr, weight_ptr, loss_ptr,
    stride_logits, stride_teacher, stride_grad, stride_target, stride_weight, n_cols,
    n_classes, mask_id, ignore_index, temperature, max_log_ratio, softcap,
    HAS_WEIGHT: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Dense teacher, score objective, is: one pass, no LSE (the ratios are LSE-free)."""
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits
    teacher_row = teacher_ptr + row * stride_teacher
    grad_row = grad_ptr + row * stride_grad
    target, weight, live, row_ok, n_live_cols, z_a, slope_a, u_a = _dense_row_setup(
        logits_row, teacher_row, target_ptr, stride_target, weight_ptr, stride_weight, row,
        n_cols, mask_id, ignore_index, temperature, softcap, HAS_WEIGHT, SOFTCAP)
    # Column a gets its gradient after the loop, once S is known; the loop skips it.
    skipped_col = tl.where(row_ok, target, -1)

    ratio_terms = tl.zeros([BLOCK_V], tl.float32)
    is_terms = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < n_cols
        participating = (cols < n_live_cols) & (cols != mask_id)
        z, slope = _load_logits(logits_row + cols, participating, 0.0, softcap, SOFTCAP)
        u = tl.load(teacher_row + cols, mask=participating, other=0.0).to(tl.float32) / temperature
        # math.md 4.3 is: (1/V) IS(q/q_a, p/p_a) = (1/V) sum_y [e^r_y - r_y - 1] with
        # r_y = (u_y - u_a)/tau - (z_y - z_a); d/dz_k = (1/V)(1 - e^r_k) for k != a.
        log_ratio = (u - u_a) - (z - z_a)
        ratio = _clamped_exp(log_ratio, max_log_ratio)
        ratio_terms += tl.where(participating, ratio, 0.0)
        is_terms += tl.where(participating, ratio - log_ratio - 1.0, 0.0)
        grad = tl.where(participating, weight * (1.0 - ratio) / n_classes, 0.0)
        grad = _chain(grad, slope, SOFTCAP)
        tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty),
                 mask=in_row & (cols != skipped_col))

    # Every r_y depends on z_a with slope +1: d/dz_a = (1/V)(sum_y e^r_y - V) (r_a = 0).
    ratio_sum = tl.sum(ratio_terms, axis=0)
    grad_a = _chain(weight * (ratio_sum - n_classes) / n_classes, slope_a, SOFTCAP)
    tl.debug_barrier()  # z_a is read by every thread before column a is overwritten
    tl.store(grad_row + target, grad_a.to(grad_ptr.dtype.element_ty), mask=row_ok)
    row_loss = tl.sum(is_terms, axis=0) / n_classes
    _store_row_loss(loss_ptr, row, row_loss, weight, live, row_ok)


@triton.jit
def _topk_row_setup(target_ptr, stride_target, weight_ptr, stride_weight, topk_idx_row,
                    stride_idx_col, row, n_cols, n_topk, mask_id, ignore_index,
                    HAS_WEIGHT: tl.constexpr, BLOCK_K: tl.constexpr):
    """_row_setup for a top-K teacher: the row is computed only if every top-K id is a
    column too; returns the loop bounds over V and over K (0 skips) and the K positions."""
    target, weight, live, target_ok = _row_setup(target_ptr, stride_target, weight_ptr,
                                                 stride_weight, row, n_cols, mask_id,
                                                 ignore_index, HAS_WEIGHT)
    positions = tl.arange(0, BLOCK_K)
    in_topk = positions < tl.where(live, n_topk, 0)
    raw_cols = tl.load(topk_idx_row + positions * stride_idx_col, mask=in_topk, other=0)
    bad_cols = in_topk & ((raw_cols < 0) | (raw_cols >= n_cols))
    row_ok = live & target_ok & (tl.sum(bad_cols.to(tl.int32), axis=0) == 0)
    n_live_cols = tl.where(row_ok, n_cols, 0)
    n_live_topk = tl.where(row_ok, n_topk, 0)
    return target, weight, live, row_ok, n_live_cols, n_live_topk, positions


@triton.jit
def _sparse_entries(logits_row, topk_idx_row, topk_ratio_row, stride_idx_col, stride_ratio_col,
                    positions, n_live_topk, target, z_a, mask_id, max_log_ratio, softcap,
                    DIVERGENCE: tl.constexpr, TAIL_ZERO: tl.constexpr, SOFTCAP: tl.constexpr):
    """Top-K entries at `positions`: column, whether counted, z there (and its softcap slope),
    loss and gradient terms.

    math.md 4.4, B_y = exp(z_y - z_a), A_y = exp(rho_y); entries equal to a or mask_id are not
    counted, duplicates each count, nothing is read when n_live_topk = 0 (row not computed).
    grad_terms[j] is (V / weight) d loss / d z at column S_j; column a receives minus their
    sum, since every term depends on z_y - z_a.
    """
    in_topk = positions < n_live_topk
    cols = tl.load(topk_idx_row + positions * stride_idx_col, mask=in_topk, other=0).to(tl.int64)
    counted = in_topk & (cols != target) & (cols != mask_id)
    log_a = tl.load(topk_ratio_row + positions * stride_ratio_col, mask=counted,
                    other=0.0).to(tl.float32)
    z, slope = _load_logits(logits_row + cols, counted, 0.0, softcap, SOFTCAP)
    log_b = z - z_a
    if DIVERGENCE == _IS:
        # is: A/B - log(A/B) - 1 per y in S; d/dz_y = 1 - A_y/B_y.
        log_ratio = log_a - log_b
        ratio = _clamped_exp(log_ratio, max_log_ratio)
        loss_terms = ratio - log_ratio - 1.0
        grad_terms = 1.0 - ratio
    else:
        # gkl: A_y (rho_y - log B_y) - A_y per y in S; d/dz_y = -A_y.
        big_a = _clamped_exp(log_a, max_log_ratio)
        loss_terms = big_a * (log_a - log_b) - big_a
        grad_terms = -big_a
        if not TAIL_ZERO:
            # tail ignore: + B_y for y in S only; d/dz_y = B_y.
            big_b = _clamped_exp(log_b, max_log_ratio)
            loss_terms += big_b
            grad_terms += big_b
    loss_terms = tl.where(counted, loss_terms, 0.0)
    grad_terms = tl.where(counted, grad_terms, 0.0)
    return cols, counted, z, slope, loss_terms, grad_terms


@triton.jit
def _sparse_target_kernel(
    logits_ptr, grad_ptr, target_ptr, weight_ptr, loss_ptr, lse_ptr, topk_idx_ptr,
    topk_ratio_ptr, stride_logits, stride_grad, stride_idx_row, stride_idx_col,
    stride_ratio_row, stride_ratio_col, n_topk, stride_target, stride_weight, n_cols, n_classes,
    mask_id, ignore_index, max_log_ratio, softcap, lse_square_scale,
    DIVERGENCE: tl.constexpr, TAIL_ZERO: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, Z_LOSS: tl.constexpr, RETURN_LSE: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK_K: tl.constexpr,
):
    """Sparse top-K teacher, score objective (math.md 4.4): is, or gkl with tail zero / ignore."""
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits
    grad_row = grad_ptr + row * stride_grad
    topk_idx_row = topk_idx_ptr + row * stride_idx_row
    topk_ratio_row = topk_ratio_ptr + row * stride_ratio_row
    target, weight, live, row_ok, n_live_cols, n_live_topk, positions = _topk_row_setup(
        target_ptr, stride_target, weight_ptr, stride_weight, topk_idx_row, stride_idx_col,
        row, n_cols, n_topk, mask_id, ignore_index, HAS_WEIGHT, BLOCK_K)
    z_a, slope_a = _load_logits(logits_row + target, row_ok, 0.0, softcap, SOFTCAP)
    cols, counted, z_s, slope_s, loss_terms, grad_terms = _sparse_entries(
        logits_row, topk_idx_row, topk_ratio_row, stride_idx_col, stride_ratio_col, positions,
        n_live_topk, target, z_a, mask_id, max_log_ratio, softcap, DIVERGENCE, TAIL_ZERO,
        SOFTCAP)

    # Duplicate columns in S each count, so column S_j gets the sum of grad_terms over every
    # copy of it. The copies are matched in registers (K x K, in CHUNK_K slices) and only the
    # first copy stores the combined value: one plain store per column, the cancelling terms
    # (B - A) formed in float32 and rounded once, no atomics (which would round the dense part
    # to the grad dtype first, and which have no bf16/fp16 form on every GPU).
    combined_terms = tl.zeros([BLOCK_K], tl.float32)
    earlier_copies = tl.zeros([BLOCK_K], tl.int32)
    for chunk in range(0, n_live_topk, CHUNK_K):
        chunk_positions = chunk + tl.arange(0, CHUNK_K)
        chunk_cols, chunk_counted, _, _, _, chunk_grad_terms = _sparse_entries(
            logits_row, topk_idx_row, topk_ratio_row, stride_idx_col, stride_ratio_col,
            chunk_positions, n_live_topk, target, z_a, mask_id, max_log_ratio, softcap,
            DIVERGENCE, TAIL_ZERO, SOFTCAP)
        same_col = (cols[:, None] == chunk_cols[None, :]) & chunk_counted[None, :]
        combined_terms += tl.sum(tl.where(same_col, chunk_grad_terms[None, :], 0.0), axis=1)
        earlier = same_col & (chunk_positions[None, :] < positions[:, None])
        earlier_copies += tl.sum(earlier.to(tl.int32), axis=1)
    first_copy = counted & (earlier_copies == 0)

    row_loss = tl.sum(loss_terms, axis=0)
    grad_at_s = combined_terms
    grad_at_a = -tl.sum(grad_terms, axis=0)
    # z-loss (gkl tail zero, the one score case that forms the LSE): its weighted coefficient
    # of p, added to every column's gradient below.
    z_loss = tl.full([], 0.0, tl.float32)
    z_p_coef = tl.full([], 0.0, tl.float32)
    lse = tl.full([], 0.0, tl.float32)
    if TAIL_ZERO:
        # tail zero: sum_{y != a} B_y = exp(LSE - z_a) - 1, clamped (math.md 4.4, 4.6). Gradient:
        # p_k/p_a at k != a, p_a/p_a - 1/p_a at a, with p_k/p_a = exp(log(1/p_a) + log p_k).
        lse = _row_lse(logits_row, n_live_cols, n_cols, mask_id, softcap, SOFTCAP, BLOCK_V)
        log_inv_pa = tl.minimum(lse - z_a, max_log_ratio)
        inv_pa = tl.exp(log_inv_pa)
        row_loss += inv_pa - 1.0
        z_loss, z_p_coef = _z_loss(lse, weight, lse_square_scale, Z_LOSS)
        grad_at_s += tl.exp(log_inv_pa + z_s - lse)
        grad_at_a += tl.exp(log_inv_pa + z_a - lse) - inv_pa

    # The pass over V writes the dense part (tail zero) or zeros; after a barrier the K + 1
    # non-zero columns are overwritten with their final values, computed from logits gathered
    # before the first store (grad may alias logits).
    tl.debug_barrier()
    for start in range(0, n_cols, BLOCK_V):
        cols_v = start + tl.arange(0, BLOCK_V)
        in_row = cols_v < n_cols
        grad = tl.zeros([BLOCK_V], tl.float32)
        if TAIL_ZERO:
            participating = (cols_v < n_live_cols) & (cols_v != mask_id)
            z, slope = _load_logits(logits_row + cols_v, participating, 0.0, softcap, SOFTCAP)
            grad = weight * tl.exp(log_inv_pa + z - lse) / n_classes
            if Z_LOSS:
                grad += z_p_coef * tl.exp(z - lse)
            grad = _chain(tl.where(participating, grad, 0.0), slope, SOFTCAP)
        tl.store(grad_row + cols_v, grad.to(grad_ptr.dtype.element_ty), mask=in_row)
    tl.debug_barrier()
    out_dtype = grad_ptr.dtype.element_ty
    grad_s = weight * grad_at_s / n_classes
    grad_a = weight * grad_at_a / n_classes
    if Z_LOSS:
        grad_s += z_p_coef * tl.exp(z_s - lse)
        grad_a += z_p_coef * tl.exp(z_a - lse)
    grad_s = _chain(grad_s, slope_s, SOFTCAP)
    grad_a = _chain(grad_a, slope_a, SOFTCAP)
    tl.store(grad_row + cols, grad_s.to(out_dtype), mask=first_copy)
    tl.store(grad_row + target, grad_a.to(out_dtype), mask=row_ok)
    _store_row_loss(loss_ptr, row, row_loss / n_classes + z_loss, weight, live, row_ok)
    if TAIL_ZERO:
        _store_row_lse(lse_ptr, row, lse, row_ok, RETURN_LSE)


# Below this student mass on S, 1 - P_S from the gathered p_y keeps all but a bit of its
# precision; above it, the rest's mass comes from a pass of its own.
_EXACT_REST_ABOVE = tl.constexpr(0.5)


@triton.jit
def _in_topk(cols_v, topk_idx_row, stride_idx_col, n_live_topk, mask_id, CHUNK_K: tl.constexpr):
    """Whether each column of the block is one of the row's counted top-K columns."""
    hit = tl.zeros(cols_v.shape, tl.int32)
    for chunk in range(0, n_live_topk, CHUNK_K):
        positions = chunk + tl.arange(0, CHUNK_K)
        in_topk = positions < n_live_topk
        cols = tl.load(topk_idx_row + positions * stride_idx_col, mask=in_topk, other=-1)
        cols = tl.where(in_topk & (cols != mask_id), cols, -1).to(tl.int64)
        hit += tl.sum((cols_v[:, None] == cols[None, :]).to(tl.int32), axis=1)
    return hit > 0


@triton.jit
def _sparse_distrib_kernel(
    logits_ptr, grad_ptr, target_ptr, weight_ptr, loss_ptr, lse_ptr, topk_idx_ptr,
    topk_value_ptr, stride_logits, stride_grad, stride_idx_row, stride_idx_col,
    stride_value_row, stride_value_col, n_topk, stride_target, stride_weight, n_cols, n_classes,
    mask_id, ignore_index, max_log_ratio, softcap, lse_square_scale,
    DIVERGENCE: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, Z_LOSS: tl.constexpr, RETURN_LSE: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK_K: tl.constexpr,
    REST_CHUNK_K: tl.constexpr,
):
    """Top-K teacher, distrib objective (docs/math.md 4.5): q_j = exp(value_j) on S.

    renormalize (kl): q' = q / Q on S; grad p - q'. zero: cells S + {R}, q_R = max(0, 1 - Q),
    p_R = 1 - P_S; grad off S = exp(z - LSE_R) (M p_R - q_R) for kl and
    exp(z - LSE_R) (1/V)((1 - r_R) - p_R E) for is; on S M p_y - q_j and (1/V)((1 - r_j) - p_y E)
    (M: the cells' q mass; E = sum_cells (1 - r), r = q / p clamped).
    """
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits
    grad_row = grad_ptr + row * stride_grad
    topk_idx_row = topk_idx_ptr + row * stride_idx_row
    topk_value_row = topk_value_ptr + row * stride_value_row
    target, weight, live, row_ok, n_live_cols, n_live_topk, positions = _topk_row_setup(
        target_ptr, stride_target, weight_ptr, stride_weight, topk_idx_row, stride_idx_col,
        row, n_cols, n_topk, mask_id, ignore_index, HAS_WEIGHT, BLOCK_K)
    in_topk = positions < n_live_topk
    cols = tl.load(topk_idx_row + positions * stride_idx_col, mask=in_topk, other=0).to(tl.int64)
    counted = in_topk & (cols != mask_id)
    values = tl.load(topk_value_row + positions * stride_value_col, mask=counted,
                     other=float("-inf")).to(tl.float32)
    z_s, slope_s = _load_logits(logits_row + cols, counted, 0.0, softcap, SOFTCAP)

    # Copies of a column (refused in checked mode) get one combined value, stored once.
    earlier_copies = tl.zeros([BLOCK_K], tl.int32)
    for chunk in range(0, n_live_topk, CHUNK_K):
        chunk_positions = chunk + tl.arange(0, CHUNK_K)
        chunk_in = chunk_positions < n_live_topk
        chunk_cols = tl.load(topk_idx_row + chunk_positions * stride_idx_col, mask=chunk_in,
                             other=-1).to(tl.int64)
        same = ((cols[:, None] == chunk_cols[None, :]) & chunk_in[None, :]
                & (chunk_positions[None, :] < positions[:, None]))
        earlier_copies += tl.sum(same.to(tl.int32), axis=1)
    first_copy = counted & (earlier_copies == 0)
    n_distinct = tl.sum(first_copy.to(tl.int32), axis=0)

    lse = _row_lse(logits_row, n_live_cols, n_cols, mask_id, softcap, SOFTCAP, BLOCK_V)
    z_loss, z_p_coef = _z_loss(lse, weight, lse_square_scale, Z_LOSS)
    log_p = z_s - lse
    if RENORMALIZE:
        value_max = tl.max(values, axis=0)
        log_q = values - (value_max + tl.log(tl.sum(tl.exp(values - value_max), axis=0)))
    else:
        log_q = values
    q = tl.where(counted, tl.exp(log_q), 0.0)
    mass = tl.sum(q, axis=0)

    # The rest cell (tail zero).
    rest_nonempty = n_distinct.to(tl.float32) < n_classes
    log_p_rest = tl.full([], 0.0, tl.float32)
    q_rest = tl.full([], 0.0, tl.float32)
    log_q_rest = tl.full([], float("-inf"), tl.float32)
    if not RENORMALIZE:
        student_mass = tl.sum(tl.where(first_copy, tl.exp(log_p), 0.0), axis=0)
        exact = rest_nonempty & (student_mass > _EXACT_REST_ABOVE)
        rest_max = tl.full([], float("-inf"), tl.float32)
        rest_sum = tl.full([], 0.0, tl.float32)
        for start in range(0, tl.where(exact, n_cols, 0), BLOCK_V):
            cols_v = start + tl.arange(0, BLOCK_V)
            rest = ((cols_v < n_cols) & (cols_v != mask_id)
                    & ~_in_topk(cols_v, topk_idx_row, stride_idx_col, n_live_topk, mask_id,
                                REST_CHUNK_K))
            z, _ = _load_logits(logits_row + cols_v, rest, float("-inf"), softcap, SOFTCAP)
            rest_max, rest_sum = _online_lse_step(rest_max, rest_sum, z)
        log_p_rest = tl.where(exact, rest_max + tl.log(rest_sum) - lse,
                              tl.log(tl.maximum(1.0 - student_mass, 0.0)))
        log_p_rest = tl.where(rest_nonempty, log_p_rest, float("-inf"))
        q_rest = tl.maximum(1.0 - mass, 0.0)
        log_q_rest = tl.log(q_rest)
    # The rest is a cell where the teacher has mass off S (renormalize: q_rest = 0, none).
    rest_is_cell = rest_nonempty & (q_rest > 0.0)
    total_mass = mass + tl.where(rest_is_cell, q_rest, 0.0)

    # Loss, and the entries' per-column gradient terms.
    kl = tl.sum(tl.where(q > 0.0, q * (log_q - log_p), 0.0), axis=0)
    kl += tl.where(rest_is_cell, q_rest * (log_q_rest - log_p_rest), 0.0)
    entry_terms = -q
    row_is = tl.full([], 0.0, tl.float32)
    cell_excess = tl.full([], 0.0, tl.float32)
    r_rest = tl.full([], 0.0, tl.float32)
    if DIVERGENCE != _KL:
        log_r = log_q - log_p
        r = _clamped_exp(log_r, max_log_ratio)
        row_is = tl.sum(tl.where(counted, r - log_r - 1.0, 0.0), axis=0)
        cell_excess = tl.sum(tl.where(counted, 1.0 - r, 0.0), axis=0)
        log_r_rest = tl.where(rest_is_cell, log_q_rest - log_p_rest, 0.0)
        r_rest = tl.where(rest_is_cell, _clamped_exp(log_r_rest, max_log_ratio), 0.0)
        row_is += tl.where(rest_is_cell, r_rest - log_r_rest - 1.0, 0.0)
        cell_excess += tl.where(rest_is_cell, 1.0 - r_rest, 0.0)
        is_entry_terms = tl.where(counted, (1.0 - r) / n_classes, 0.0)
        entry_terms = is_entry_terms if DIVERGENCE == _IS else entry_terms + is_entry_terms
    entry_terms = tl.where(counted, entry_terms, 0.0)
    combined_terms = tl.zeros([BLOCK_K], tl.float32)
    for chunk in range(0, n_live_topk, CHUNK_K):
        chunk_positions = chunk + tl.arange(0, CHUNK_K)
        chunk_in = chunk_positions < n_live_topk
        chunk_cols = tl.load(topk_idx_row + chunk_positions * stride_idx_col, mask=chunk_in,
                             other=-1).to(tl.int64)
        # the chunk's entry terms, by position: picked out of entry_terms with a one-hot sum
        pick = positions[:, None] == chunk_positions[None, :]
        chunk_terms = tl.sum(tl.where(pick, entry_terms[:, None], 0.0), axis=0)
        same = (cols[:, None] == chunk_cols[None, :]) & chunk_in[None, :]
        combined_terms += tl.sum(tl.where(same, chunk_terms[None, :], 0.0), axis=1)
    p_s = tl.exp(log_p)
    column_terms = tl.zeros([BLOCK_K], tl.float32)
    if DIVERGENCE != _IS:
        column_terms += total_mass * p_s
    if DIVERGENCE != _KL:
        column_terms -= p_s * cell_excess / n_classes
    grad_at_s = column_terms + combined_terms

    # Off S: renormalize p itself; zero exp(z - LSE_R) times the rest's coefficient.
    p_rest = tl.exp(log_p_rest)
    rest_coef = tl.full([], 0.0, tl.float32)
    if DIVERGENCE != _IS:
        rest_coef += total_mass * p_rest - q_rest
    if DIVERGENCE != _KL:
        rest_coef += (tl.where(rest_is_cell, 1.0 - r_rest, 0.0) - p_rest * cell_excess) / n_classes
    rest_live = log_p_rest > float("-inf")
    lse_rest = lse + tl.where(rest_live, log_p_rest, 0.0)
    tl.debug_barrier()  # the entries' logits are read before the first store of the row
    for start in range(0, n_cols, BLOCK_V):
        cols_v = start + tl.arange(0, BLOCK_V)
        in_row = cols_v < n_cols
        participating = (cols_v < n_live_cols) & (cols_v != mask_id)
        z, slope = _load_logits(logits_row + cols_v, participating, 0.0, softcap, SOFTCAP)
        if RENORMALIZE:
            grad = total_mass * tl.exp(z - lse)
        else:
            grad = tl.where(rest_live, rest_coef * tl.exp(z - lse_rest), 0.0)
        grad = weight * grad
        if Z_LOSS:
            grad += z_p_coef * tl.exp(z - lse)
        grad = _chain(tl.where(participating, grad, 0.0), slope, SOFTCAP)
        tl.store(grad_row + cols_v, grad.to(grad_ptr.dtype.element_ty), mask=in_row)
    tl.debug_barrier()
    out_dtype = grad_ptr.dtype.element_ty
    grad_s = weight * grad_at_s
    if Z_LOSS:
        grad_s += z_p_coef * p_s
    tl.store(grad_row + cols, _chain(grad_s, slope_s, SOFTCAP).to(out_dtype), mask=first_copy)
    row_loss = _divergence_loss(kl, row_is / n_classes, DIVERGENCE)
    _store_row_loss(loss_ptr, row, row_loss + z_loss, weight, live, row_ok)
    _store_row_lse(lse_ptr, row, lse, row_ok, RETURN_LSE)


def _block_config(n_cols: int, device: torch.device):
    """(BLOCK_V, num_warps): one block covers up to 4096 columns on a GPU, 256 interpreted."""
    cap = _GPU_BLOCK_V if device.type == "cuda" else _INTERPRETER_BLOCK_V
    block_v = max(16, min(triton.next_power_of_2(n_cols), cap))
    return block_v, min(16, max(1, block_v // 256))


def _device_guard(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_rows(name: str, rows: Optional[torch.Tensor]) -> None:
    if rows is not None and rows.dim() == 2 and rows.shape[1] > 1 and rows.stride(1) != 1:
        raise ValueError(f"{name} must have contiguous rows (stride(1) == 1), "
                         f"got strides {tuple(rows.stride())}")


def tcsm_loss_rows(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                   class_weight: Optional[torch.Tensor], teacher_logits: Optional[torch.Tensor],
                   topk_indices: Optional[torch.Tensor], topk_values: Optional[torch.Tensor],
                   grad: torch.Tensor, options: LossOptions) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row weighted TCSM losses (N,) float32 and the row LSEs ((N,) with ``return_lse``,
    else empty); writes weight * d row_loss / d logits to grad.

    logits (N, V) and grad (N, V, same dtype, may be logits itself) have contiguous rows;
    class_weight (V,) float32 (data target only); teacher_logits (N, V) selects the dense
    teacher, topk_indices / topk_values (N, K) the top-K one (log-ratios for the score
    objective, log-probabilities for distrib), neither the data target. Arguments are assumed
    validated (ops/loss.py); a live row with a target or top-K id out of range (or a target
    equal to mask_id) gets a NaN loss and a zero gradient, and nothing out of bounds is read.
    """
    n_rows, n_cols = logits.shape
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    return_lse = options.return_lse
    row_lse = torch.zeros(n_rows if return_lse else 0, dtype=torch.float32,
                          device=logits.device)
    if n_rows == 0:
        return row_loss, row_lse
    for name, rows in (("logits", logits), ("grad", grad), ("teacher_logits", teacher_logits)):
        _check_rows(name, rows)
    mask_id = -1 if options.mask_id is None else options.mask_id
    n_classes = float(n_cols - (1 if mask_id >= 0 else 0))  # V of the formulas
    block_v, num_warps = _block_config(n_cols, logits.device)
    has_weight = weight is not None
    weight_arg = weight if has_weight else row_loss  # never read when HAS_WEIGHT is false
    weight_stride = weight.stride(0) if has_weight else 0  # 0 for a broadcast weight too
    lse_arg = row_lse if return_lse else row_loss  # never written when RETURN_LSE is false
    code = _DIVERGENCE_CODES[options.divergence]
    row_args = (target.stride(0), weight_stride, n_cols, n_classes, mask_id,
                options.ignore_index)
    temperature, max_log_ratio = float(options.temperature), float(options.max_log_ratio)
    softcap = float(options.softcap or 0.0)
    lse_square_scale = float(options.lse_square_scale)
    flags = dict(HAS_WEIGHT=has_weight, SOFTCAP=softcap > 0, BLOCK_V=block_v,
                 num_warps=num_warps)
    lse_flags = dict(Z_LOSS=lse_square_scale > 0, RETURN_LSE=return_lse)
    score = options.objective == "score"
    grid = (n_rows,)
    with _device_guard(logits.device):
        if teacher_logits is not None:
            dense_args = (logits, teacher_logits, grad, target, weight_arg, row_loss)
            strides = (logits.stride(0), teacher_logits.stride(0), grad.stride(0), *row_args,
                       temperature, max_log_ratio, softcap)
            if score and options.divergence == "is":
                _dense_score_is_kernel[grid](*dense_args, *strides, **flags)
            else:
                _dense_target_kernel[grid](*dense_args, lse_arg, *strides, lse_square_scale,
                                           DIVERGENCE=code, SCORE=score, **flags, **lse_flags)
        elif topk_indices is not None:
            n_topk = topk_indices.shape[1]
            block_k = triton.next_power_of_2(max(n_topk, 1))
            chunk_k = max(1, min(block_k, _MATCH_TILE // block_k))
            topk_args = (logits, grad, target, weight_arg, row_loss, lse_arg, topk_indices,
                         topk_values, logits.stride(0), grad.stride(0), topk_indices.stride(0),
                         topk_indices.stride(1), topk_values.stride(0), topk_values.stride(1),
                         n_topk, *row_args, max_log_ratio, softcap, lse_square_scale)
            if score:
                # is sums over S alone, so the tail only matters for gkl.
                tail_zero = options.tail == "zero" and options.divergence == "gkl"
                _sparse_target_kernel[grid](
                    *topk_args, DIVERGENCE=code, TAIL_ZERO=tail_zero, BLOCK_K=block_k,
                    CHUNK_K=chunk_k, **flags, **lse_flags)
            else:
                rest_chunk_k = max(1, min(block_k, _MATCH_TILE // block_v))
                _sparse_distrib_kernel[grid](
                    *topk_args, DIVERGENCE=code, RENORMALIZE=options.tail == "renormalize",
                    BLOCK_K=block_k, CHUNK_K=chunk_k, REST_CHUNK_K=rest_chunk_k, **flags,
                    **lse_flags)
        else:
            has_class_weight = class_weight is not None
            class_weight_arg = class_weight if has_class_weight else row_loss
            # sum of the participating columns' weights (label smoothing's W), on the device
            class_weight_sum = row_loss
            if has_class_weight:
                keep = torch.ones(n_cols, dtype=torch.bool, device=logits.device)
                if mask_id >= 0:
                    keep[mask_id] = False
                class_weight_sum = class_weight[keep].sum().reshape(1)
            _data_target_kernel[grid](
                logits, grad, target, weight_arg, row_loss, lse_arg, class_weight_arg,
                class_weight_sum, logits.stride(0), grad.stride(0), *row_args, max_log_ratio,
                softcap, lse_square_scale, float(options.label_smoothing),
                DIVERGENCE=code, SMOOTHING=options.label_smoothing > 0,
                HAS_CLASS_WEIGHT=has_class_weight, **flags, **lse_flags)
    return row_loss, row_lse
