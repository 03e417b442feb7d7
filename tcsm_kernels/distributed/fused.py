"""The vocabulary-parallel loss's fused shard pass: row statistics out, merged row scalars in.

Every loss of ``LOSS_CASES`` reads the vocabulary only through a few row statistics: the
student's LSE, linear sums (sum_y c_y z_y, c = 1 or the class weights; sum_y q_y (u_y - z_y)
and sum_y (u_y - z_y) with a dense teacher), the LSE of the columns off a top-K set, the sum of
the dense teacher's clamped ratios, and gathers at a few ids (the target, the top-K entries).
Each rank

1. reduces its shard (N, W) with one kernel to partial statistics (N, 6) (csrc/shard_rows.h);
2. gathers its raw logits (and the teacher's) at the row's ids it owns;
3. joins ONE all-gather of those (N, 7 + K) values (one more with a dense teacher) and merges them (log-sum-exp of the
   partial LSEs, sums of the linear sums and of the owned logits); the dense teacher's is and
   gkl-distrib need the ratio sum sum_y exp(min(u_y - z_y - delta, M)) at the merged delta:
   a second kernel and one all-reduce of (N,);
4. evaluates the row formulas (``reference.data_losses`` etc.) on the merged (N,) / (N, K)
   statistics with autograd, giving d loss_i / d statistic;
5. writes its shard's gradient with a second kernel by the chain rule through the statistics,
       d loss / d z_k = alpha p_k + beta c_k + gamma [k off S] exp(z_k - LSE_R)
                        + eta exp_(u_k - z_k - delta) + kappa   (+ the ids' gradients),
   alpha = dL/dLSE - C dL/dD, beta = dL/dD (c = 1 or w; D = sum_y c_y (z_y - LSE),
   C = sum_y c_y), or with a teacher beta = -dL/dcross (c = q), eta = -dL/dE, kappa =
   -dL/d sum (u - z); gamma = dL/dLSE_R;
   and keeps it for backward (no (N, W) temporary beyond the gradient itself).

Every rank ends with the same row losses; backward gives each rank its shard's gradient with no
further collective. ``backend="reference"`` runs the reference formulas on the shard instead
(``loss.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .. import _backend, _checks, reference
from ..loss_options import LossOptions
from ..ops.loss import gradient_buffer, scale_kept_gradient
from .shards import ShardColumns, ShardLayout

_STATS = 6  # per row and rank, as the kernels write them (csrc/shard_rows.h)

if _backend.cpp_available():
    @torch.library.register_fake("tcsm::shard_row_stats_cpu")
    def _stats_fake(logits, *args):
        return logits.new_empty((logits.shape[0], _STATS), dtype=torch.float32)

    @torch.library.register_fake("tcsm::shard_row_grad_cpu")
    def _grad_fake(*args):
        return None

    @torch.library.register_fake("tcsm::shard_ratio_sums_cpu")
    def _ratio_fake(logits, *args):
        return logits.new_empty(logits.shape[:1], dtype=torch.float32)


def shard_backend(options: LossOptions, logits: torch.Tensor) -> str:
    """'cpp', 'triton' or 'reference' (the reference formulas on the shard) for the shard pass."""
    return _backend.resolve(options.backend, logits.device, logits.dtype)


def _kernel(backend: str, name: str):
    """The shard row kernel ``name`` (row_stats, ratio_sums, row_grad) of a backend: the C++ op
    ``tcsm::shard_<name>_cpu`` or ``triton.shard_rows.<name>``, which take the same arguments."""
    if backend == "cpp":
        return getattr(torch.ops.tcsm, f"shard_{name}_cpu")
    from ..triton import shard_rows
    return getattr(shard_rows, name)


def _merged_lse(max_, sums):
    """log sum_r sums_r exp(shift_r) over the ranks (dim 0), shift_r = max_r (0 where -inf):
    the kernels' sums are relative to that shift."""
    shift = torch.where(torch.isfinite(max_), max_, torch.zeros_like(max_))
    top = max_.amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    scaled = torch.where(sums > 0, sums * torch.exp(shift - top), torch.zeros_like(sums))
    return top + torch.log(scaled.sum(0)), shift, top


def _ratio_shift(options: LossOptions, stats: dict, z_a: torch.Tensor) -> torch.Tensor:
    """delta of the dense ratios r_y = (u_y - z_y) - delta: LSE_u - LSE for distrib
    (r = log q_y / p_y), u_a - z_a for score (r = log (q_y / q_a) / (p_y / p_a))."""
    if options.objective == "distrib":
        return stats["teacher_lse"] - stats["lse"]
    return stats["teacher_a"] - z_a


def _dense_losses(options: LossOptions, v: int, stats: dict, z_a: torch.Tensor):
    """(N,) math.md 4.2-4.3 from the merged statistics."""
    lse, lse_u = stats["lse"], stats["teacher_lse"]
    kl = stats["cross"] - lse_u + lse  # sum q (log q - log p) = sum q (u - z) - LSE_u + LSE
    if options.objective == "distrib" and options.divergence == "kl":
        return kl
    if options.objective == "score" and options.divergence == "gkl":
        return reference.dense_score_gkl_losses(kl, stats["teacher_a"] - lse_u, z_a - lse, v,
                                                options)
    # is: (1/V) sum_y (exp_(r_y) - r_y - 1) = (E - sum (u - z) + V delta - V) / V, E the sum
    # of the clamped ratios at the merged delta; E varies with delta as E exp(-(delta - delta0))
    delta = _ratio_shift(options, stats, z_a)
    ratio_sum = stats["ratio_sum"] * torch.exp(-(delta - delta.detach()))
    is_ = (ratio_sum - stats["gap"] + v * delta - v) / v
    return is_ if options.objective == "score" or options.divergence == "is" else kl + is_


def _row_losses(inp: _checks.LossInputs, options: LossOptions, v: int, stats: dict,
                x_ids: torch.Tensor, ids: torch.Tensor):
    """(N,) unweighted row losses (z-loss included) from the merged statistics, in a graph
    whose leaves are the statistics of ``_LEAVES`` (those present) and x_ids."""
    z_ids = reference.student_logits(x_ids, options)
    z_a, lse = z_ids[:, 0], stats["lse"]
    if inp.kind == "data":
        class_a = None
        if inp.class_weight is not None:
            class_a = inp.class_weight.to(lse.dtype)[ids[:, 0]]
        rows = reference.data_losses(lse, z_a, stats["linear"], class_a, v, options)
    elif inp.kind == "dense":
        rows = _dense_losses(options, v, stats, z_a)
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
            logp = z_s - lse[:, None]
            log_p_rest = rest_nonempty = None
            if options.tail == "zero":
                rest_nonempty = counted.sum(1) < v
                lse_rest = stats["rest_lse"]
                log_p_rest = torch.where(torch.isfinite(lse_rest), lse_rest - lse,
                                         torch.where(rest_nonempty, float("-inf"), 0.0))
            rows = reference.topk_cell_losses(values, counted, logp, log_p_rest, rest_nonempty, v,
                                              options)
    if options.lse_square_scale > 0:
        rows = rows + options.lse_square_scale * lse ** 2
    return rows


class _ShardPass:
    """One rank's part of the fused shard pass over its logits x (N, W)."""

    def __init__(self, x: torch.Tensor, inp: _checks.LossInputs, options: LossOptions,
                 layout: ShardLayout, backend: str):
        self.x, self.inp, self.options, self.layout, self.backend = x, inp, options, layout, backend
        self.cols = ShardColumns(layout, options.mask_id)
        self.mask_col = -1 if self.cols.local_mask is None else self.cols.local_mask
        active = inp.target != options.ignore_index
        self.live = active if inp.weight is None else active & (inp.weight != 0)
        # the ids whose logits the formulas read: the target, then the top-K entries
        a = torch.where(active, inp.target, torch.zeros_like(inp.target)).long()
        self.ids = a[:, None] if inp.kind != "topk" else torch.cat(
            [a[:, None], inp.topk_indices.long()], 1)
        width = x.shape[1]
        self.owned = (self.ids >= layout.start) & (self.ids < layout.start + width)
        self.local_ids = (self.ids - layout.start).clamp(0, max(width - 1, 0))
        self.teacher = inp.teacher_logits if inp.kind == "dense" else None
        self.excluded = None  # top-K tail zero: the entries, out of the rest's LSE
        if inp.kind == "topk" and options.objective == "distrib" and options.tail == "zero":
            self.excluded = torch.where(self.owned[:, 1:], self.local_ids[:, 1:], -1)
        # c of the linear statistic: the class weights where smoothing weighs the columns
        self.column, self.c_here, self.c_total = None, float(self.cols.held), float(self.cols.v)
        if inp.class_weight is not None and options.label_smoothing > 0:
            weights = inp.class_weight.float().clone()
            if options.mask_id is not None:
                weights[options.mask_id] = 0
            self.column = weights[layout.start:layout.start + width].contiguous()
            self.c_here, self.c_total = float(self.column.sum()), float(weights.sum())
        # the dense ratio divergences, which need the sum of clamped ratios (E)
        self.ratio = self.teacher is not None and (
            options.divergence == "is" or (options.objective, options.divergence) == (
                "distrib", "gkl"))
        self.softcap = options.softcap or 0.0  # the kernels' "off"

    def _owned_values(self, t: torch.Tensor) -> torch.Tensor:
        """t (N, W) at the row's ids this rank owns, 0 elsewhere: (N, K') float64."""
        if not t.shape[1]:
            return torch.zeros(self.ids.shape, dtype=torch.float64, device=t.device)
        return torch.where(self.owned, t.gather(1, self.local_ids).double(), 0.0)

    def merged_statistics(self):
        """This shard's statistics and owned logits, merged over the ranks by one all-gather
        (and for the dense ratio divergences one all-reduce of their (N,) sums): the merged
        statistics (N,) and the raw logits at the ids (N, K')."""
        x, layout = self.x, self.layout
        if x.shape[1]:
            stats = _kernel(self.backend, "row_stats")(
                x, self.teacher, self.column, self.excluded, self.mask_col,
                self.options.temperature, self.softcap).double()
        else:
            stats = torch.tensor([float("-inf"), 0.0, 0.0, float("-inf"), 0.0, 0.0],
                                 dtype=torch.float64, device=x.device).expand(x.shape[0], _STATS)
        parts = [stats, self._owned_values(x)]
        if self.teacher is None:  # sum_y c_y z_y, unshifted
            shift = torch.where(torch.isfinite(stats[:, 0]), stats[:, 0], 0.0)
            stats = stats.clone()
            stats[:, 2] += self.c_here * shift
            parts[0] = stats
        else:  # the teacher's logit at the target
            parts.append(self._owned_values(self.teacher)[:, :1])
        packed = torch.cat(parts, 1).contiguous()
        gathered = [torch.empty_like(packed) for _ in range(layout.world)]
        dist.all_gather(gathered, packed, group=layout.group)
        every = torch.stack(gathered)  # (P, N, 6 + K' (+ 1))
        k = self.ids.shape[1]
        x_ids = every[:, :, _STATS:_STATS + k].sum(0)
        lse, _, _ = _merged_lse(every[:, :, 0], every[:, :, 1])
        merged = {"lse": lse}
        if self.teacher is None:
            merged["linear"] = every[:, :, 2].sum(0) - self.c_total * lse  # sum c (z - LSE)
            if self.excluded is not None:
                merged["rest_lse"], _, _ = _merged_lse(every[:, :, 3], every[:, :, 4])
            return merged, x_ids
        lse_u, shift_u, _ = _merged_lse(every[:, :, 2], every[:, :, 3])
        share_u = torch.where(every[:, :, 3] > 0, torch.exp(shift_u - lse_u),
                              torch.zeros_like(shift_u))
        merged.update(teacher_lse=lse_u, cross=(every[:, :, 4] * share_u).sum(0),  # sum q (u - z)
                      gap=every[:, :, 5].sum(0),  # sum (u - z)
                      teacher_a=every[:, :, _STATS + k].sum(0) / self.options.temperature)
        if self.ratio:
            delta = _ratio_shift(self.options, merged,
                                 reference.student_logits(x_ids[:, 0], self.options))
            merged["delta"] = delta
            sums = torch.zeros_like(delta)
            if x.shape[1]:
                sums = _kernel(self.backend, "ratio_sums")(
                    x, self.teacher, delta.float(), self.mask_col, self.options.temperature,
                    self.softcap, self.options.max_log_ratio).double()
            dist.all_reduce(sums, group=layout.group)
            merged["ratio_sum"] = sums
        return merged, x_ids

    def statistic_gradients(self, merged: dict, x_ids: torch.Tensor):
        """The row losses (N,) and their gradients with respect to the statistics (a dict of
        (N,)) and the raw logits at the ids (N, K'), zero on rows without loss."""
        with torch.enable_grad():
            leaves = {k: merged[k].detach().requires_grad_() for k in _LEAVES if k in merged}
            x_leaf = x_ids.detach().requires_grad_()
            row_loss = _row_losses(self.inp, self.options, self.cols.v, dict(merged, **leaves),
                                   x_leaf, self.ids)
            total = torch.where(self.live, row_loss, torch.zeros_like(row_loss)).sum()
            names = list(leaves)
            grads = torch.autograd.grad(total, [leaves[k] for k in names] + [x_leaf],
                                        allow_unused=True)
        zero = torch.zeros_like(merged["lse"])
        g = {k: zero if gr is None else torch.where(self.live, gr, zero)
             for k, gr in zip(names, grads[:-1])}
        g_ids = grads[-1] if grads[-1] is not None else torch.zeros_like(x_ids)
        g_ids = torch.where(self.live[:, None] & self.owned, g_ids, torch.zeros_like(g_ids))
        return row_loss, g, g_ids

    def write_gradient(self, grad: torch.Tensor, merged: dict, g: dict, g_ids: torch.Tensor):
        """The shard's gradient by the chain rule through the statistics (module docstring),
        then the ids' gradients scattered."""
        zero = torch.zeros_like(merged["lse"])
        f32 = (lambda t: None if t is None else t.float().contiguous())
        if self.teacher is None:
            alpha = g["lse"] - self.c_total * g.get("linear", zero)
            beta = g.get("linear", zero)  # d sum c (z - LSE) / dz_k = c_k - C p_k
        else:
            alpha, beta = g["lse"], -g["cross"]  # d sum q (u - z) / dz_k = -q_k
        gamma = rest_lse = eta = delta = kappa = None
        if self.excluded is not None:  # d LSE_R / dz_k = exp(z_k - LSE_R) off S
            live_rest = torch.isfinite(merged["rest_lse"])
            gamma = torch.where(live_rest, g["rest_lse"], zero)
            rest_lse = torch.where(live_rest, merged["rest_lse"], zero)
        if self.ratio:  # d E / dz_k = -exp_(r_k) at fixed delta; d sum (u - z) / dz_k = -1
            eta, delta, kappa = -g["ratio_sum"], merged["delta"], -g["gap"]
        coefficients = [f32(t) for t in (merged["lse"], alpha, beta, merged.get("teacher_lse"),
                                          gamma, rest_lse, eta, delta, kappa)]
        if self.x.shape[1]:
            _kernel(self.backend, "row_grad")(
                self.x, self.teacher, self.column, self.excluded, *coefficients, grad,
                self.mask_col, self.options.temperature, self.softcap, self.options.max_log_ratio)
            grad.scatter_add_(1, self.local_ids, g_ids.to(grad.dtype))


# the statistics the row formulas differentiate through
_LEAVES = ("lse", "linear", "cross", "rest_lse", "gap", "ratio_sum")


class _ShardRowLoss(torch.autograd.Function):
    """Row losses and LSEs (N,) of the vocabulary-parallel loss from this rank's logits shard
    (N, W); backward = kept shard gradient * per-row upstream gradient."""

    @staticmethod
    def forward(ctx, logits, inp: _checks.LossInputs, options: LossOptions,
                layout: ShardLayout, backend: str, inplace: bool):
        x = logits.detach()
        pass_ = _ShardPass(x, inp, options, layout, backend)
        merged, x_ids = pass_.merged_statistics()
        row_loss, g, g_ids = pass_.statistic_gradients(merged, x_ids)
        grad = x if inplace else gradient_buffer(x)
        pass_.write_gradient(grad, merged, g, g_ids)
        lse = merged["lse"].float()
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(lse)
        return row_loss.detach().float(), lse

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


__all__ = ["fused_shard_loss", "shard_backend"]
