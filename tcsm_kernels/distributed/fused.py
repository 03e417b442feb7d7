"""The vocabulary-parallel loss's fused shard pass: row statistics out, merged row scalars in.

Where a loss reads the vocabulary only through the student's LSE, one linear sum and gathers
at a few ids (the data target, the dense teacher's distrib kl, every top-K case), each rank

1. reduces its shard (N, W) with one kernel to partial statistics (N, 5): max, sum exp and a
   linear sum sum_y c_y z_y (c = 1 or the class weights); with a dense teacher its max and
   sum exp and sum_y q_y (u_y - z_y); for top-K tail zero the LSE of the columns off S;
2. gathers its raw logits at the row's ids it owns (the target, the top-K entries);
3. joins ONE all-gather of those (N, 5 + 1 + K) values and merges them (log-sum-exp of the
   partial LSEs, sums of the linear sums and of the owned logits);
4. evaluates the row formulas (``reference.data_losses`` etc.) on the merged (N,) / (N, K)
   statistics with autograd, giving d loss_i / d statistic;
5. writes its shard's gradient with a second kernel by the chain rule through the statistics,
       d loss / d z_k = alpha p_k + beta c_k + gamma [k off S] exp(z_k - LSE_R)
                        (+ the ids' gradients, scattered),
   alpha = dL/dLSE - C dL/dD, beta = dL/dD (c = 1 or w), or beta = -dL/dcross (c = q),
   gamma = dL/dLSE_R (D = sum_y c_y (z_y - LSE), C = sum_y c_y, LSE_R the rest's LSE),
   and keeps it for backward (no (N, W) temporary beyond the gradient itself).

Every rank ends with the same row losses; backward gives each rank its shard's gradient with no
further collective. The other cases (dense is/gkl, dense score) run the reference formulas on
the shard (``loss.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .. import _backend, _checks, reference
from ..loss_options import LossOptions
from ..ops.loss import gradient_buffer, scale_kept_gradient
from .shards import ShardColumns, ShardLayout

_STATS = 5  # per row and rank, as the kernels write them (csrc/shard_rows.h)

if _backend.cpp_available():
    @torch.library.register_fake("tcsm::shard_row_stats_cpu")
    def _stats_fake(logits, *args):
        return logits.new_empty((logits.shape[0], _STATS), dtype=torch.float32)

    @torch.library.register_fake("tcsm::shard_row_grad_cpu")
    def _grad_fake(*args):
        return None


def fused_case(kind: str, options: LossOptions) -> bool:
    """Whether the shard pass of this case runs on the fused kernels (the loss reads the row
    through statistics): the data target, dense distrib kl, and every top-K case."""
    if kind == "dense":
        return options.objective == "distrib" and options.divergence == "kl"
    return True


def shard_backend(options: LossOptions, kind: str, logits: torch.Tensor) -> str:
    """'cpp', 'triton' or 'reference' for the shard pass; a forced kernel backend on a case the
    kernels do not cover is an error."""
    chosen = _backend.resolve(options.backend, logits.device, logits.dtype)
    if chosen != "reference" and not fused_case(kind, options):
        if options.backend != "auto":
            raise ValueError(f"backend={options.backend!r}: the vocabulary-parallel {kind} "
                             f"{options.objective} {options.divergence} loss has no fused shard "
                             "pass; use backend='auto' or 'reference'")
        return "reference"
    return chosen


def _row_stats(backend, logits, teacher, column, excluded, mask_col, options):
    softcap = options.softcap or 0.0
    if backend == "cpp":
        return torch.ops.tcsm.shard_row_stats_cpu(logits, teacher, column, excluded, mask_col,
                                                  options.temperature, softcap)
    from ..triton import shard_rows
    return shard_rows.row_stats(logits, teacher, column, excluded, mask_col,
                                options.temperature, softcap)


def _row_grad(backend, logits, teacher, column, excluded, coefficients, out, mask_col,
              options):
    """coefficients: lse, alpha, beta, teacher_lse, gamma, rest_lse (N,) float32 or None."""
    softcap = options.softcap or 0.0
    if backend == "cpp":
        torch.ops.tcsm.shard_row_grad_cpu(logits, teacher, column, excluded, *coefficients, out,
                                          mask_col, options.temperature, softcap)
        return
    from ..triton import shard_rows
    shard_rows.row_grad(logits, teacher, column, excluded, *coefficients, out, mask_col,
                        options.temperature, softcap)


def _merged_lse(max_, sums):
    """log sum_r sums_r exp(shift_r) over the ranks (dim 0), shift_r = max_r (0 where -inf):
    the kernels' sums are relative to that shift."""
    shift = torch.where(torch.isfinite(max_), max_, torch.zeros_like(max_))
    top = max_.amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    scaled = torch.where(sums > 0, sums * torch.exp(shift - top), torch.zeros_like(sums))
    return top + torch.log(scaled.sum(0)), shift, top


def _row_losses(inp: _checks.LossInputs, options: LossOptions, v: int, stats: dict,
                x_ids: torch.Tensor, ids: torch.Tensor):
    """(N,) unweighted row losses (z-loss included) from the merged statistics, in a graph
    whose leaves are the statistics (lse, linear, cross, rest_lse: those present) and x_ids."""
    z_ids = x_ids if options.softcap is None else options.softcap * torch.tanh(
        x_ids / options.softcap)
    z_a, lse = z_ids[:, 0], stats["lse"]
    if inp.kind == "data":
        class_a = None
        if inp.class_weight is not None:
            class_a = inp.class_weight.to(lse.dtype)[ids[:, 0]]
        rows = reference.data_losses(lse, z_a, stats["linear"], class_a, v, options)
    elif inp.kind == "dense":  # distrib kl = sum q (log q - log p) = sum q (u - z) - LSE_u + LSE
        rows = stats["cross"] - stats["teacher_lse"] + lse
    else:
        idx = ids[:, 1:]
        counted = (torch.ones_like(idx, dtype=torch.bool) if options.mask_id is None
                   else idx != options.mask_id)
        values = inp.topk_values.to(lse.dtype)
        z_s = torch.where(counted, z_ids[:, 1:], torch.zeros_like(z_ids[:, 1:]))
        if options.objective == "score":
            counted = counted & (idx != inp.target[:, None])
            rows = reference.topk_score_losses(z_s, z_a, lse, values, counted, v, options)
        else:
            def exp_(x):
                return reference._clamped_exp(x, options.max_log_ratio)

            logp = z_s - lse[:, None]
            log_p_rest = rest_nonempty = None
            if options.tail == "zero":
                rest_nonempty = counted.sum(1) < v
                lse_rest = stats["rest_lse"]
                log_p_rest = torch.where(torch.isfinite(lse_rest), lse_rest - lse,
                                         torch.where(rest_nonempty, float("-inf"), 0.0))
            rows = reference.topk_cell_losses(values, counted, logp, log_p_rest, rest_nonempty,
                                              options.divergence, options.tail, exp_, v)
    if options.lse_square_scale > 0:
        rows = rows + options.lse_square_scale * lse ** 2
    return rows


class _ShardRowLoss(torch.autograd.Function):
    """Row losses and LSEs (N,) of the vocabulary-parallel loss from this rank's logits shard
    (N, W); backward = kept shard gradient * per-row upstream gradient."""

    @staticmethod
    def forward(ctx, logits, inp: _checks.LossInputs, options: LossOptions,
                layout: ShardLayout, backend: str, inplace: bool):
        rows, width = logits.shape
        cols = ShardColumns(layout, options.mask_id)
        mask_col = -1 if cols.local_mask is None else cols.local_mask
        active = inp.target != options.ignore_index
        live = active if inp.weight is None else active & (inp.weight != 0)
        # the ids whose logits the formulas read: the target, then the top-K entries
        a = torch.where(active, inp.target, torch.zeros_like(inp.target)).long()
        ids = a[:, None] if inp.kind != "topk" else torch.cat([a[:, None],
                                                                inp.topk_indices.long()], 1)
        owned = (ids >= layout.start) & (ids < layout.start + width)
        local_ids = (ids - layout.start).clamp(0, max(width - 1, 0))
        x = logits.detach()
        if width:
            x_owned = torch.where(owned, x.gather(1, local_ids).float(), 0.0)
        else:
            x_owned = torch.zeros(ids.shape, device=x.device)

        # 1. this shard's statistics; c = the class weights where smoothing weighs columns
        column, c_here, c_total = None, float(cols.held), float(cols.v)
        if inp.class_weight is not None and options.label_smoothing > 0:
            weights = inp.class_weight.float()
            if options.mask_id is not None:
                weights = weights.clone()
                weights[options.mask_id] = 0
            column = weights[layout.start:layout.start + width].contiguous()
            c_here, c_total = float(column.sum()), float(weights.sum())
        excluded = None
        tail_rest = inp.kind == "topk" and options.objective == "distrib" and (
            options.tail == "zero")
        if tail_rest:
            excluded = torch.where(owned[:, 1:], local_ids[:, 1:], -1)
        teacher = inp.teacher_logits if inp.kind == "dense" else None
        if width:
            stats = _row_stats(backend, x, teacher, column, excluded, mask_col, options)
        else:
            stats = torch.tensor([float("-inf"), 0.0, 0.0, float("-inf"), 0.0],
                                 device=x.device).expand(rows, _STATS)
        stats = stats.double()
        if teacher is None:  # sum_y c_y z_y, unshifted, in float64
            shift = torch.where(torch.isfinite(stats[:, 0]), stats[:, 0], 0.0)
            stats[:, 2] = stats[:, 2] + c_here * shift

        # 2-3. one all-gather of (N, 5 + K') per rank
        packed = torch.cat([stats, x_owned.double()], 1).contiguous()
        gathered = [torch.empty_like(packed) for _ in range(layout.world)]
        dist.all_gather(gathered, packed, group=layout.group)
        every = torch.stack(gathered)  # (P, N, 5 + K')
        lse, _, _ = _merged_lse(every[:, :, 0], every[:, :, 1])
        merged = {"lse": lse}
        if teacher is None:
            merged["linear"] = every[:, :, 2].sum(0) - c_total * lse  # sum c (z - LSE)
            if tail_rest:
                merged["rest_lse"], _, _ = _merged_lse(every[:, :, 3], every[:, :, 4])
        else:
            lse_u, shift_u, top_u = _merged_lse(every[:, :, 2], every[:, :, 3])
            scale_u = torch.where(every[:, :, 3] > 0, torch.exp(shift_u - top_u - (lse_u - top_u)),
                                  torch.zeros_like(shift_u))
            merged["teacher_lse"] = lse_u
            merged["cross"] = (every[:, :, 4] * scale_u).sum(0)  # sum q (u - z)
        x_ids = every[:, :, _STATS:].sum(0)

        # 4. the row formulas and their gradients with respect to the statistics
        v = cols.v
        with torch.enable_grad():
            leaves = {k: merged[k].detach().requires_grad_()
                      for k in ("lse", "linear", "cross", "rest_lse") if k in merged}
            x_leaf = x_ids.detach().requires_grad_()
            stats_in = dict(merged, **leaves)
            row_loss = _row_losses(inp, options, v, stats_in, x_leaf, ids)
            total = torch.where(live, row_loss, torch.zeros_like(row_loss)).sum()
            names = list(leaves)
            grads = torch.autograd.grad(total, [leaves[k] for k in names] + [x_leaf],
                                        allow_unused=True)
        zero = torch.zeros_like(lse)
        g = {k: (zero if gr is None else torch.where(live, gr, zero))
             for k, gr in zip(names, grads[:-1])}
        g_ids = grads[-1] if grads[-1] is not None else torch.zeros_like(x_ids)
        g_ids = torch.where(live[:, None] & owned, g_ids, torch.zeros_like(g_ids))

        # 5. the shard's gradient: alpha p + beta c (+ gamma exp(z - LSE_R) on the rest's
        # columns: d LSE_R / dz_k), then the ids' gradients scattered
        if teacher is None:
            alpha = g["lse"] - c_total * g.get("linear", zero)
            beta = g.get("linear", zero)
        else:
            alpha, beta = g["lse"], -g["cross"]
        gamma = rest_lse = None
        if tail_rest:
            live_rest = torch.isfinite(merged["rest_lse"])
            gamma = torch.where(live_rest, g["rest_lse"], zero).float()
            rest_lse = torch.where(live_rest, merged["rest_lse"], zero).float()
        teacher_lse = None if teacher is None else merged["teacher_lse"].float()
        coefficients = (lse.float(), alpha.float(), beta.float(), teacher_lse, gamma, rest_lse)
        grad = x if inplace else gradient_buffer(x)
        if width:
            _row_grad(backend, x, teacher, column, excluded, coefficients, grad, mask_col,
                      options)
            grad.scatter_add_(1, local_ids, g_ids.to(grad.dtype))
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(lse)
        return row_loss.detach().float(), lse.float()

    @staticmethod
    def backward(ctx, grad_rows, grad_lse):
        (grad,) = ctx.saved_tensors
        return scale_kept_gradient(grad, grad_rows), None, None, None, None, None


def fused_shard_loss(logits: torch.Tensor, inp: _checks.LossInputs, options: LossOptions,
                     layout: ShardLayout, backend: str, normalizer, inplace: bool):
    """The loss (as ``fused_tcsm_loss`` returns it) from the shard ``logits`` (N, W) and the
    validated inputs ``inp`` (whose logits/teacher_logits are this rank's shards)."""
    rows, lse = _ShardRowLoss.apply(logits, inp, options, layout, backend, inplace)
    return reference.reduce_row_losses(rows, lse, inp, options, normalizer)


__all__ = ["fused_case", "fused_shard_loss", "shard_backend"]
