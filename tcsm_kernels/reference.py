"""docs/math.md in plain PyTorch, the oracle: materialising, obviously correct, differentiable.

Every fused backend is tested against these functions. Math runs in float64 for float64 inputs
and in float32 otherwise. Gradients come from autograd; the one non-smooth piece, the exponent
clamp of math.md 4.6, uses ``_clamped_exp`` whose derivative is its own (clamped) value, which is
exactly what the fused kernels compute in closed form.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks, philox
from .columns import Columns, remap_ids
from .loss_options import LossOptions, LossOutput
from .ops.step_output import StepOutput, step_result  # noqa: F401 (StepOutput re-exported)


class _ClampedExp(torch.autograd.Function):
    """exp(min(x, limit)) with derivative exp(min(x, limit)) (math.md 4.6: never overflow)."""

    @staticmethod
    def forward(ctx, x, limit):
        out = torch.exp(x.clamp(max=limit))
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad * out, None


def _clamped_exp(x: torch.Tensor, limit: float) -> torch.Tensor:
    return _ClampedExp.apply(x, limit)


def clamped_exp_of(options: LossOptions):
    """x -> exp(min(x, options.max_log_ratio)) (math.md 4.6), the loss formulas' exp_."""
    return lambda x: _clamped_exp(x, options.max_log_ratio)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _drop_column(per_column: torch.Tensor, mask_id: Optional[int]) -> torch.Tensor:
    """A (V,) per-column vector without the mask column."""
    return Columns(per_column.shape[0], mask_id).participating(per_column[None])[0]


def _teacher_kl(logq: torch.Tensor, logp: torch.Tensor, total=lambda x: x.sum(1)) -> torch.Tensor:
    """(N,) KL(q || p) = sum_y q_y (log q_y - log p_y), with 0 log 0 = 0 where q_y = 0 (a -inf
    teacher logit); the ratio is zeroed there before the product so autograd sees no NaN.
    ``total`` sums a row (a ``Columns`` reduction for column tensors)."""
    log_ratio = torch.where(logq > float("-inf"), logq - logp, 0.0)
    return total(logq.exp() * log_ratio)


def _topk_distrib_losses(cols: Columns, z, lse, idx, counted, log_q, options: LossOptions):
    """(N,) top-K distribution losses (math.md 4.5). z (N, V_held) participating columns, idx
    (N, K) remapped columns, counted (N, K) entries that take part, log_q (N, K)
    log-probabilities."""
    logp = cols.gather(z, idx) - lse[:, None]
    if options.tail == "renormalize":
        return topk_cell_losses(log_q, counted, logp, None, None, cols.v, options)
    # tail zero: the cells are the K entries and the rest R (the columns outside S).
    in_s = cols.members(idx, counted, z)
    rest_nonempty = cols.any(~in_s)
    # log p_R = logsumexp(z on R) - LSE; rows whose rest is empty or all -inf take it from
    # the whole row instead (then unused), so that autograd meets no logsumexp of only -inf.
    rest_live = cols.amax(z.masked_fill(in_s, float("-inf"))) > float("-inf")
    lse_rest = cols.logsumexp(z.masked_fill(in_s & rest_live[:, None], float("-inf")))
    log_p_rest = torch.where(rest_live, lse_rest - lse,
                             torch.where(rest_nonempty, float("-inf"), 0.0))
    return topk_cell_losses(log_q, counted, logp, log_p_rest, rest_nonempty, cols.v, options)


def topk_cell_losses(log_q, counted, logp, log_p_rest, rest_nonempty, v, options: LossOptions):
    """(N,) math.md 4.5 from the cells' log-probabilities: log_q, logp (N, K) of the entries
    (counted (N, K) those that take part), and for tail zero log p_R and whether R is
    nonempty (N,); v the participating column count."""
    exp_ = clamped_exp_of(options)

    log_q = torch.where(counted, log_q, float("-inf"))
    if options.tail == "renormalize":  # q' = q / sum_S q on S, 0 elsewhere
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
        return _teacher_kl(log_q, logp)
    q_rest = (1 - log_q.exp().sum(1)).clamp(min=0)
    log_q_rest = torch.where(q_rest > 0, q_rest.clamp(min=1e-38).log(), float("-inf"))
    q_rest_counted = rest_nonempty & (q_rest > 0)
    kl = _teacher_kl(log_q, logp) + torch.where(q_rest_counted, q_rest * (log_q_rest - log_p_rest), 0)
    if options.divergence == "kl":
        return kl
    # IS over the cells, / V as the dense one: (1/V) sum_c [r_c - log r_c - 1], r = q_c / p_c;
    # the rest is a cell where the teacher has mass off S (else only the K cells count).
    log_r = log_q - logp
    cells = torch.where(counted, exp_(log_r) - log_r - 1, 0).sum(1)
    log_r_rest = torch.where(q_rest_counted, log_q_rest - log_p_rest, 0)
    cells = cells + torch.where(q_rest_counted, exp_(log_r_rest) - log_r_rest - 1, 0)
    is_ = cells / v
    return is_ if options.divergence == "is" else kl + is_


def student_logits(logits: torch.Tensor, options: LossOptions) -> torch.Tensor:
    """The logits the loss sees, in the compute dtype: with a softcap c (Gemma; Liger's and
    CCE's softcap) c * tanh(logits / c), differentiated through by autograd."""
    z = logits.to(_compute_dtype(logits.dtype))
    return z if options.softcap is None else options.softcap * torch.tanh(z / options.softcap)


def _row_losses(inp: _checks.LossInputs, options: LossOptions, cols: Columns):
    """(N,) unweighted per-row losses (docs/math.md 4) with the z-loss, and the student's row
    LSE (N,); ignored rows hold finite placeholders."""
    z = cols.participating(student_logits(inp.logits, options))
    lse = cols.logsumexp(z)
    rows = _divergence_rows(inp, options, cols, z, lse)
    if options.lse_square_scale > 0:  # z-loss (PaLM; Liger's lse_square_scale): s LSE^2
        rows = rows + options.lse_square_scale * lse ** 2
    return rows, lse


def _divergence_rows(inp: _checks.LossInputs, options: LossOptions, cols: Columns,
                     z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """(N,) unweighted divergences of the student's participating logits z (N, V_held)."""
    divergence, mask_id, temperature = options.divergence, options.mask_id, options.temperature
    ct = z.dtype
    v = cols.v
    active = inp.target != options.ignore_index
    a = remap_ids(torch.where(active, inp.target, torch.zeros_like(inp.target)), mask_id).long()
    a = a.clamp(0, v - 1)
    z_a = cols.gather(z, a[:, None])[:, 0]
    logp = z - lse[:, None]

    exp_ = clamped_exp_of(options)

    if inp.kind == "data":  # math.md 4.1
        class_weight = None
        if inp.class_weight is not None:  # F.cross_entropy's weight=: w_a per row
            class_weight = _drop_column(inp.class_weight.to(ct), mask_id)
        # sum_y c_y log p_y with c = w where smoothing weighs the columns, else c = 1
        column = class_weight if options.label_smoothing > 0 else None
        log_p_sum = cols.sum(logp if column is None else logp * cols.local(column))
        return data_losses(lse, z_a, log_p_sum, None if class_weight is None else class_weight[a],
                           v, options)

    if inp.kind == "dense":
        u = cols.participating(inp.teacher_logits.to(ct)) / temperature
        logq = u - cols.logsumexp(u)[:, None]
        kl = _teacher_kl(logq, logp, cols.sum)
        if options.objective == "distrib":  # math.md 4.2
            log_ratio = logq - logp  # log(q / p)
            is_ = cols.sum(exp_(log_ratio) - log_ratio - 1) / v
            return {"kl": kl, "is": is_, "gkl": kl + is_}[divergence]
        logq_a = cols.gather(logq, a[:, None])[:, 0]
        logp_a = cols.gather(logp, a[:, None])[:, 0]
        if divergence == "gkl":
            return dense_score_gkl_losses(kl, logq_a, logp_a, v, options)
        # math.md 4.3, is: r_y = log(A_y / B_y) = (log q_y - log q_a) - (z_y - z_a)
        r = (logq - logq_a[:, None]) - (z - z_a[:, None])
        return cols.sum(exp_(r) - r - 1) / v

    idx = inp.topk_indices.long()
    values = inp.topk_values.to(ct)
    counted = torch.ones_like(idx, dtype=torch.bool) if mask_id is None else idx != mask_id
    remapped = remap_ids(idx, mask_id).clamp(0, v - 1)
    if options.objective == "distrib":
        return _topk_distrib_losses(cols, z, lse, remapped, counted, values, options)
    # math.md 4.4: sparse top-K teacher, score objective; entries equal to a are skipped.
    counted &= idx != inp.target[:, None]
    return topk_score_losses(cols.gather(z, remapped), z_a, lse, values, counted, v, options)


def data_losses(lse, z_a, log_p_sum, class_weight_a, v, options: LossOptions):
    """(N,) math.md 4.1 from the row's statistics: the LSE, the target's logit z_a,
    log_p_sum = sum_y c_y log p_y (c = the class weights with label smoothing and class weights,
    else 1) and the class weight of the target (or None)."""
    kl = lse - z_a
    is_ = (clamped_exp_of(options)(lse - z_a) + log_p_sum) / v
    rows = {"kl": kl, "is": is_, "gkl": kl + is_}[options.divergence]
    if class_weight_a is not None:
        rows = rows * class_weight_a
    if options.label_smoothing > 0:
        # F.cross_entropy(label_smoothing=eps, weight=w):
        # (1 - eps) w_a (-log p_a) + (eps / V) sum_y w_y (-log p_y)
        eps = options.label_smoothing
        rows = (1 - eps) * rows - eps / v * log_p_sum
    return rows


def dense_score_gkl_losses(kl, logq_a, logp_a, v, options: LossOptions):
    """(N,) math.md 4.3, gkl: (1/V) GKL(q/q_a, p/p_a) from KL(q || p) and the reference
    token's log-probabilities under teacher and student."""
    exp_ = clamped_exp_of(options)

    return ((kl - logq_a + logp_a) * exp_(-logq_a) - exp_(-logq_a) + exp_(-logp_a)) / v


def topk_score_losses(z_s, z_a, lse, rho, counted, v, options: LossOptions):
    """(N,) math.md 4.4 from the logits z_s (N, K) of the entries, the target's z_a, the LSE,
    the teacher's log-ratios rho (N, K) and the entries that count (N, K)."""
    exp_ = clamped_exp_of(options)

    log_b = z_s - z_a[:, None]  # log B_y = z_y - z_a
    if options.divergence == "is":
        r = rho - log_b
        return torch.where(counted, exp_(r) - r - 1, 0).sum(1) / v
    big_a = exp_(rho)
    cross = torch.where(counted, big_a * (rho - log_b) - big_a, 0).sum(1)
    if options.tail == "zero":  # sum_{y != a} B_y = exp(LSE - z_a) - 1
        return (cross + exp_(lse - z_a) - 1) / v
    return (cross + torch.where(counted, exp_(log_b), 0).sum(1)) / v


def mean_denominator(inp: _checks.LossInputs, options: LossOptions, normalizer,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The divisor of reduction="mean" (math.md 5), a tensor (no host sync): the caller's
    normalizer; else the number of non-ignored rows, whatever the row weights; with class
    weights, as F.cross_entropy, the sum of the non-ignored rows' w[target] (1 where that is 0,
    as the count is at least 1, so that all-ignored batches give 0)."""
    device = inp.target.device
    if normalizer is not None:
        return torch.as_tensor(normalizer, device=device).to(dtype)
    active = inp.target != options.ignore_index
    if inp.class_weight is None:
        return active.sum().clamp(min=1).to(dtype)
    safe = torch.where(active, inp.target, torch.zeros_like(inp.target)).long()
    total = torch.where(active, inp.class_weight.to(dtype)[safe], 0).sum()
    return torch.where(total == 0, 1, total)


def _reduce_rows(row_loss: torch.Tensor, inp: _checks.LossInputs, options: LossOptions,
                 normalizer) -> torch.Tensor:
    """math.md 5 reductions of weighted per-row losses (ignored rows already zero)."""
    if options.reduction == "none":
        return row_loss.reshape(inp.batch_shape)
    total = row_loss.sum()
    if options.reduction == "sum":
        return total
    return total / mean_denominator(inp, options, normalizer, total.dtype)


def tcsm_loss(logits, target, *, teacher_logits=None, teacher_topk=None, divergence="kl",
              objective="distrib", weight=None, class_weight=None, mask_id=None,
              temperature=1.0, reduction="mean", ignore_index=-100, normalizer=None,
              tail="zero", max_log_ratio=30.0, softcap=None, lse_square_scale=0.0,
              label_smoothing=0.0, return_lse=False, out_dtype=None, inplace_backward=False,
              backend="reference", check=None):
    """TCSM loss (docs/math.md 4-5) on logits (..., V); same signature as ``fused_tcsm_loss``.

    ``inplace_backward`` and ``backend`` are accepted so the two functions can be swapped; the
    reference has no in-place gradient and is its own backend. Returns float32 (float64 for
    float64 logits) unless ``out_dtype`` says otherwise: a scalar, or per-row losses (...) for
    ``reduction="none"``; a ``LossOutput`` with ``return_lse``.
    """
    options = LossOptions.from_arguments(locals())
    inp = _checks.loss_inputs(logits, target, teacher_logits=teacher_logits,
                              teacher_topk=teacher_topk, weight=weight, normalizer=normalizer,
                              options=options, class_weight=class_weight)
    return loss_from_inputs(inp, options, normalizer)


def loss_result(loss: torch.Tensor, options: LossOptions, lse: Optional[torch.Tensor] = None,
                z_loss: Optional[torch.Tensor] = None):
    """What the loss functions return: the loss in ``out_dtype`` (default: as computed), or,
    for ``return_lse``, a ``LossOutput`` with the row LSEs (constant) and the reduced z-loss."""
    out_dtype = options.out_dtype or loss.dtype
    if not options.return_lse:
        return loss.to(out_dtype)
    return LossOutput(loss.to(out_dtype), lse.detach(), z_loss.detach().to(out_dtype))


def loss_from_inputs(inp: _checks.LossInputs, options: LossOptions, normalizer=None,
                     cols: Optional[Columns] = None):
    """``tcsm_loss`` on inputs already validated and flattened by ``_checks.loss_inputs``;
    ``cols``: the columns ``inp.logits`` holds (default: all of them)."""
    if cols is None:
        cols = Columns(inp.logits.shape[1], options.mask_id)
    rows, lse = _row_losses(inp, options, cols)
    return reduce_row_losses(rows, lse, inp, options, normalizer)


def reduce_row_losses(rows: torch.Tensor, lse: torch.Tensor, inp: _checks.LossInputs,
                      options: LossOptions, normalizer=None):
    """The loss from unweighted per-row losses and LSEs (N,): the finiteness check, the row
    weights (ignored and weight-0 rows give 0), the reduction and the returned LSE."""
    active = inp.target != options.ignore_index
    _checks.finite_rows(torch.where(active, rows, 0),
                        (("logits", inp.logits), ("teacher_logits", inp.teacher_logits),
                         ("teacher_topk values", inp.topk_values)),
                        _checks.resolve_check(options.check, inp.logits.device))
    scale = active.to(rows.dtype)
    if inp.weight is not None:
        scale = scale * inp.weight.to(rows.dtype)
    # where (not a product) so that an inf placeholder on an ignored row cannot leak a NaN
    row_loss = torch.where(scale != 0, rows * scale, torch.zeros_like(rows))
    loss = _reduce_rows(row_loss, inp, options, normalizer)
    if not options.return_lse:
        return loss_result(loss, options)
    lse = torch.where(scale != 0, lse, torch.zeros_like(lse)).detach()
    z_rows = torch.where(scale != 0, options.lse_square_scale * lse ** 2 * scale, 0)
    return loss_result(loss, options, lse.reshape(inp.batch_shape),
                       _reduce_rows(z_rows, inp, options, normalizer))


def topk_concrete_scores(teacher_logits, target, k, *, temperature=1.0, correction=None,
                         backend="reference", check=None):
    """docs/math.md 6: per row the k largest teacher logits (ties: lower index first).

    Returns indices (..., k) int64, log-ratios ``(u_y - u_a) / tau (+ correction)`` (..., k)
    float32 and the row LSE of ``u / tau`` (...) float32. ``correction`` (..., V) is indexed by
    vocabulary column; (..., k) (k < V) is added position by position.
    """
    u, a, corr, batch_shape = _checks.topk_inputs(
        teacher_logits, target, k, temperature=temperature, correction=correction,
        backend=backend, check=check)
    ct = _compute_dtype(u.dtype)
    u = u.to(ct)
    order = torch.sort(u, dim=1, descending=True, stable=True).indices[:, :k]
    u_a = u.gather(1, a.long()[:, None])
    log_ratios = (u.gather(1, order) - u_a) / temperature
    if corr is not None:
        corr = corr.to(ct)
        per_column = corr.shape[1] == u.shape[1]
        log_ratios = log_ratios + (corr.gather(1, order) if per_column else corr)
    lse = torch.logsumexp(u / temperature, dim=1)
    _checks.topk_outputs(lse, log_ratios, u, corr, _checks.resolve_check(check, u.device))
    out_dtype = torch.float64 if ct == torch.float64 else torch.float32
    return (order.reshape(batch_shape + (k,)), log_ratios.to(out_dtype).reshape(batch_shape + (k,)),
            lse.to(out_dtype).reshape(batch_shape))


def ctmc_step(logits, x, jump_prob, *, mask_id=None, temperature=1.0, frozen=None, seed=0,
              offset=0, return_x1=False, return_confidence=False, backend="reference",
              check=None):
    """math.md 7: one reverse CTMC step. logits (..., V), x (...), jump_prob broadcastable to x.

    x1 ~ softmax(z / T) without mask_id by inverse CDF with the row's Philox uniform; the row
    moves to x1 when it may change (masked path: x == mask_id; uniform path: always; never when
    frozen) and its jump uniform is below jump_prob. Returns x_next (...) int64, or a
    ``StepOutput`` with x1 and/or confidence (p(x1), top-1 minus top-2 probability, entropy).
    """
    z, x, jump, frozen, batch_shape, mask_id = _checks.step_inputs(
        logits, x, jump_prob, mask_id=mask_id, temperature=temperature, frozen=frozen, seed=seed,
        offset=offset, backend=backend, check=check)
    n, v = z.shape
    u_draw, u_jump = philox.row_uniforms(seed, offset, n, device=z.device)
    scaled = z.double() / temperature
    if mask_id is not None:
        scaled[:, mask_id] = float("-inf")
    weights = torch.exp(scaled - scaled.max(dim=1, keepdim=True).values)
    cdf = weights.cumsum(dim=1)
    total = cdf[:, -1:]
    _checks.finite_rows(total[:, 0], (("logits", z),), _checks.resolve_check(check, z.device))
    # u < 1 - 2**-33, so u * total < cdf[-1] in float64: the first column whose cdf exceeds it
    # exists and has positive weight (the mask column, of weight 0, is never picked).
    x1 = torch.searchsorted(cdf, u_draw[:, None] * total, right=True)[:, 0]
    may_change = torch.ones_like(x, dtype=torch.bool) if mask_id is None else x == mask_id
    if frozen is not None:
        may_change &= ~frozen
    moves = may_change & (u_jump < jump.double())
    x_next = torch.where(moves, x1, x.long())
    probs = weights / total
    prob = probs.gather(1, x1[:, None])[:, 0]
    top2 = probs.topk(min(2, v), dim=1).values
    margin = top2[:, 0] - (top2[:, 1] if v > 1 else 0)
    entropy = -torch.where(probs > 0, probs * probs.log(), 0).sum(1)
    return step_result(x_next, x1, prob.float(), margin.float(), entropy.float(), batch_shape,
                       return_x1, return_confidence)
