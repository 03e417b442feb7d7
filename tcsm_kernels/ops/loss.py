"""fused_tcsm_loss: TCSM losses (docs/math.md 4-5) with the gradient computed in the forward pass.

One kernel call per batch computes, for every row, the weighted loss and its gradient
d loss_i / d logits (C++ on CPU, Triton on CUDA); the gradient is kept — in a new buffer, or
written over the logits with ``inplace_backward=True`` — and backward only scales it by the
upstream gradient. Saved state beyond that buffer is O(N); there is no host sync on CUDA.
"""
from __future__ import annotations

import dataclasses

from typing import Optional, Tuple, Union

import torch
from torch import nn

from .. import _backend, _checks, reference
from ..loss_options import LossOptions, LossOutput
from .custom_op import custom_op


def _run_kernel(logits, target, weight, class_weight, teacher_logits, topk_indices, topk_values,
                grad, options: LossOptions, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted row losses (N,) float32 and the row LSEs ((N,) with ``return_lse``, else
    empty); writes weight_i * d row_loss_i / d logits into grad."""
    tensors = (logits, target, weight, class_weight, teacher_logits, topk_indices, topk_values,
               grad)
    if backend == "cpp":
        return torch.ops.tcsm.tcsm_loss_cpu(*tensors, *options.op_args(backend)[:-1])
    from ..triton.loss import tcsm_loss_rows
    return tcsm_loss_rows(*tensors, options)


@custom_op("tcsm::tcsm_loss_rows", mutates_args=("grad",))
def _loss_rows(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
               class_weight: Optional[torch.Tensor], teacher_logits: Optional[torch.Tensor],
               topk_indices: Optional[torch.Tensor], topk_values: Optional[torch.Tensor],
               grad: torch.Tensor, divergence: str, objective: str, tail: str, mask_id: int,
               temperature: float, ignore_index: int, max_log_ratio: float, softcap: float,
               lse_square_scale: float, label_smoothing: float, return_lse: bool,
               backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The options arrive flattened by ``LossOptions.op_args`` (a custom op takes no object)."""
    options = LossOptions.from_op_args(divergence, objective, tail, mask_id, temperature,
                                       ignore_index, max_log_ratio, softcap, lse_square_scale,
                                       label_smoothing, return_lse, backend)
    return _run_kernel(logits, target, weight, class_weight, teacher_logits, topk_indices,
                       topk_values, grad, options, backend)


@custom_op("tcsm::tcsm_loss_rows_inplace", mutates_args=("logits",))
def _loss_rows_inplace(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                       class_weight: Optional[torch.Tensor],
                       teacher_logits: Optional[torch.Tensor],
                       topk_indices: Optional[torch.Tensor], topk_values: Optional[torch.Tensor],
                       divergence: str, objective: str, tail: str, mask_id: int,
                       temperature: float, ignore_index: int, max_log_ratio: float,
                       softcap: float, lse_square_scale: float, label_smoothing: float,
                       return_lse: bool, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """As tcsm_loss_rows, with the gradient written over the logits themselves."""
    options = LossOptions.from_op_args(divergence, objective, tail, mask_id, temperature,
                                       ignore_index, max_log_ratio, softcap, lse_square_scale,
                                       label_smoothing, return_lse, backend)
    return _run_kernel(logits, target, weight, class_weight, teacher_logits, topk_indices,
                       topk_values, logits, options, backend)


def _rows_fake(logits: torch.Tensor, return_lse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    rows = logits.shape[0]
    return (logits.new_empty(rows, dtype=torch.float32),
            logits.new_empty(rows if return_lse else 0, dtype=torch.float32))


@_loss_rows.register_fake
def _loss_rows_fake(logits, *args):
    return _rows_fake(logits, args[-2])


@_loss_rows_inplace.register_fake
def _loss_rows_inplace_fake(logits, *args):
    return _rows_fake(logits, args[-2])


if _backend.cpp_available():
    @torch.library.register_fake("tcsm::empty_hugepage_cpu")
    def _empty_hugepage_fake(size, dtype):
        return torch.empty(size, dtype=dtype)


def gradient_buffer(logits: torch.Tensor) -> torch.Tensor:
    """(N, V) buffer for the kernel's gradient. On CPU it is backed by transparent huge pages
    and comes from a cache of freed buffers: first-touch page faults and zeroing of a fresh
    buffer cost up to several times the kernel itself (csrc/hugepage_buffer_op.cpp)."""
    if logits.device.type == "cpu" and _backend.cpp_available():
        return torch.ops.tcsm.empty_hugepage_cpu(logits.shape, logits.dtype)
    return torch.empty_like(logits)


def release_buffer_cache() -> None:
    """Frees the CPU gradient buffers the fused loss keeps for reuse (at most two, each the size
    of one (N, V) gradient), as ``torch.cuda.empty_cache`` does for CUDA memory."""
    if _backend.cpp_available():
        torch.ops.tcsm.release_buffer_cache()


def scale_kept_gradient(grad: torch.Tensor, grad_rows: torch.Tensor) -> torch.Tensor:
    """d total / d z = sum_i grad_rows_i * d loss_i / d z from the kept per-row gradients
    (N, V): scaled in place, in float32 before rounding (the buffer is the loss's; a second
    backward through the same graph is not supported). On CPU a unit upstream gradient (the
    common loss.backward()) is seen without a device sync and skips the pass over (N, V)."""
    unit = (grad_rows.device.type == "cpu" and not torch.compiler.is_compiling()
            and bool((grad_rows == 1).all()))
    if not unit:
        grad.mul_(grad_rows[:, None])
    return grad


class _FusedTCSMLoss(torch.autograd.Function):
    """Row losses (N,) from logits (N, V) and the row LSEs (constant); backward = kept gradient
    * per-row upstream grad."""

    @staticmethod
    def forward(ctx, logits, target, weight, class_weight, teacher_logits, topk_indices,
                topk_values, op_args, inplace):
        tensors = (target, weight, class_weight, teacher_logits, topk_indices, topk_values)
        if inplace:
            rows, lse = _loss_rows_inplace(logits, *tensors, *op_args)
            grad = logits
        else:
            grad = gradient_buffer(logits)
            rows, lse = _loss_rows(logits, *tensors, grad, *op_args)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(lse)
        return rows, lse

    @staticmethod
    def backward(ctx, grad_rows, grad_lse):
        (grad,) = ctx.saved_tensors
        return scale_kept_gradient(grad, grad_rows), None, None, None, None, None, None, None, None


def _row_weights(inp: _checks.LossInputs, options: LossOptions, normalizer) -> Optional[torch.Tensor]:
    """(N,) float32 row weights with the reduction's scale folded in, so the kernel's gradient
    is already d loss / d z and backward has nothing left to do for a unit upstream gradient."""
    weight_rows = None if inp.weight is None else inp.weight.to(torch.float32)
    if options.reduction == "mean":
        if weight_rows is None:
            weight_rows = torch.ones(inp.target.shape, dtype=torch.float32,
                                     device=inp.logits.device)
        weight_rows = weight_rows / reference.mean_denominator(inp, options, normalizer)
    return None if weight_rows is None else weight_rows.contiguous()


def kernel_class_weight(inp: _checks.LossInputs) -> Optional[torch.Tensor]:
    """The class weights as the kernels read them: (V,) float32, contiguous."""
    if inp.class_weight is None:
        return None
    return inp.class_weight.to(torch.float32).contiguous()


def kernel_topk(inp: _checks.LossInputs) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The top-K teacher as the kernels read it: indices (N, K) int64, values (N, K) float32,
    contiguous; (None, None) without one."""
    if inp.topk_indices is None:
        return None, None
    return (inp.topk_indices.to(torch.int64).contiguous(),
            inp.topk_values.to(torch.float32).contiguous())


def reduced_z_loss(lse: torch.Tensor, row_weights: Optional[torch.Tensor],
                   options: LossOptions, batch_shape) -> torch.Tensor:
    """The z-loss part of the loss from the kernel's row LSEs (0 on rows that carry none):
    weight_i s LSE_i^2, with the mean's scale in the row weights, reduced."""
    rows = options.lse_square_scale * lse ** 2
    if row_weights is not None:
        rows = rows * row_weights
    return rows.reshape(batch_shape) if options.reduction == "none" else rows.sum()


def fused_rows(inp: _checks.LossInputs, options: LossOptions, backend: str,
               normalizer=None) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The weighted row losses (N,) float32 of validated inputs on a fused backend,
    differentiable in ``inp.logits`` (the gradient is computed here and kept), the row LSEs
    ((N,) with ``return_lse``, else empty) and the row weights the kernel was given."""
    flat_logits = _checks.unit_column_stride(inp.logits)
    teacher = inp.teacher_logits
    if teacher is not None:
        teacher = _checks.unit_column_stride(teacher.to(flat_logits.dtype))
    topk_indices, topk_values = kernel_topk(inp)
    row_weights = _row_weights(inp, options, normalizer)
    rows, lse = _FusedTCSMLoss.apply(flat_logits, inp.target.to(torch.int64).contiguous(),
                                     row_weights, kernel_class_weight(inp), teacher,
                                     topk_indices, topk_values, options.op_args(backend),
                                     options.inplace_backward)
    return rows, lse, row_weights


def refuse_inplace_on_leaf(logits: torch.Tensor, options: LossOptions) -> None:
    if options.inplace_backward and logits.is_leaf and logits.requires_grad:
        raise RuntimeError("inplace_backward=True would overwrite logits, a leaf tensor that "
                           "requires grad (as torch refuses in-place ops on such leaves); pass "
                           "the logits as an activation (the output of the LM head) or use "
                           "inplace_backward=False")


def fused_tcsm_loss(logits: torch.Tensor, target: torch.Tensor, *,
                    teacher_logits: Optional[torch.Tensor] = None,
                    teacher_topk: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                    divergence: str = "kl", objective: str = "distrib",
                    weight: Optional[torch.Tensor] = None,
                    class_weight: Optional[torch.Tensor] = None, mask_id: Optional[int] = None,
                    temperature: float = 1.0, reduction: str = "mean", ignore_index: int = -100,
                    normalizer: Union[float, torch.Tensor, None] = None, tail: str = "zero",
                    max_log_ratio: float = 30.0, softcap: Optional[float] = None,
                    lse_square_scale: float = 0.0, label_smoothing: float = 0.0,
                    return_lse: bool = False, out_dtype: Optional[torch.dtype] = None,
                    inplace_backward: bool = False, backend: str = "auto",
                    check: Optional[bool] = None) -> Union[torch.Tensor, LossOutput]:
    """TCSM loss (docs/math.md 4-5) of logits (..., V) against clean tokens target (...), fused.

    Targets (``tcsm_kernels.LOSS_CASES`` lists each with its divergences and options):
    data (default); a dense teacher ``teacher_logits`` (..., V) (constant, cast to the logits'
    dtype, divided by ``temperature``); or a top-K teacher ``teacher_topk = (indices (..., K),
    values (..., K))``. ``objective="distrib"`` (default) fits the teacher's distribution: for a
    top-K teacher the values are log-probabilities (``topk_log_probs``), ``tail="zero"`` keeps
    the mass 1 - sum q off S as one cell, ``"renormalize"`` divides q by its sum on S.
    ``objective="score"`` fits concrete-score ratios against the reference token ``target``
    (top-K values are log-ratios, ``topk_concrete_scores``; tails "zero"/"ignore"): unbiased
    only where ``target`` is drawn from the teacher. ``divergence``: "kl" (cross-entropy),
    "is", "gkl" (= kl + is). The data-target is/gkl values are Monte-Carlo estimates with the
    constant dropped and can be negative; their gradients are unbiased.

    WEIGHTS -- two kinds, do not confuse them:
    ``weight`` (...) or broadcastable (e.g. (B, 1)) is a PER-ROW (per-token) weight, NOT
    F.cross_entropy's ``weight=``; a (V,) tensor passed here is read as per-row weights when
    it happens to broadcast (N == V) -- use ``class_weight`` for per-class weights.
    ``class_weight`` (V,) is F.cross_entropy's ``weight=`` (data target only): row i's loss is
    w[target_i] CE_i (with ``label_smoothing`` eps, torch's rule
    (1 - eps) w[a] (-log p_a) + (eps / V) sum_y w_y (-log p_y)), and ``reduction="mean"``
    divides by the sum of w[target] over the non-ignored rows, as torch does. Both weights
    may be given; they multiply.

    Rows with target == ignore_index give 0. ``mask_id`` is excluded from the model (and
    teacher) distribution. ``reduction``: "none" (per-row), "sum", "mean" = sum / (number of
    non-ignored rows), whatever the per-row weights (MDLM-style weight=is_masked thus divides by
    all rows; pass ``normalizer`` for another denominator), or / sum of class weights (above).

    Options (each refused where ``LOSS_CASES`` does not define it, naming the argument):
    ``softcap`` c > 0: the loss sees c * tanh(logits / c) (Gemma, Liger, CCE), gradient through
    it; it caps the student only: a dense teacher's logits are used as given (cap them
    yourself if the teacher was trained capped), and a -inf logit becomes -c.
    ``lse_square_scale`` s (z-loss, PaLM / Liger): + s * LSE^2 per row (LSE of the capped
    logits), times the per-row weight but not the class weight (as Liger), in the same
    reduction (Liger's mean divides the z-loss by the non-ignored count even with class
    weights; here it shares the loss's denominator). Only where the loss forms the LSE: not
    for the score objective's is, nor the top-K score tail "ignore".
    ``label_smoothing`` eps in [0, 1]: data target with divergence "kl" only, torch's
    definition (1 - eps) CE + eps mean_y(-log p_y) over the participating columns (mask_id
    excluded, V = number of them); refused for is/gkl (estimators that need a ~ q) and for
    teachers (smooth the teacher yourself).
    ``return_lse``: return a ``LossOutput(loss, lse, z_loss)`` with each row's LSE (...) float32
    (0 on rows that carry no loss; constant, no gradient through it) and the reduced z-loss
    part of ``loss``, computed by the same pass.
    ``out_dtype``: the loss's dtype; default float32 (float64 for float64 logits, which run on
    the reference); ``logits.dtype`` gives torch's convention.

    ``inplace_backward=True`` overwrites the logits with their gradient during the forward (the
    logits must not be used afterwards; saves an (N, V) buffer; refused on a leaf that requires
    grad). ``check`` (default: on for CPU tensors, off on CUDA and under torch.compile)
    validates ids (O(N)) and top-K log-probabilities (O(N K)) and raises on NaN/+inf logits of
    loss-carrying rows (read from the (N,) losses: no extra pass over V).
    ``backend``: "auto" (C++ on CPU, Triton on CUDA, reference for float64), "cpp", "triton",
    "reference".
    """
    options = LossOptions.from_arguments(locals())
    inp = _checks.loss_inputs(logits, target, teacher_logits=teacher_logits,
                              teacher_topk=teacher_topk, weight=weight, normalizer=normalizer,
                              options=options, class_weight=class_weight)
    chosen = _backend.resolve(backend, logits.device, logits.dtype)
    if chosen == "reference":
        return reference.loss_from_inputs(inp, options, normalizer)
    refuse_inplace_on_leaf(logits, options)
    rows, lse, row_weights = fused_rows(inp, options, chosen, normalizer)
    _checks.finite_rows(rows, (("logits", inp.logits), ("teacher_logits", inp.teacher_logits),
                               ("teacher_topk values", inp.topk_values)),
                        _checks.resolve_check(check, logits.device))
    loss = rows.reshape(inp.batch_shape) if reduction == "none" else rows.sum()
    if not return_lse:
        return reference.loss_result(loss, options)
    return reference.loss_result(loss, options, lse.reshape(inp.batch_shape),
                                 reduced_z_loss(lse, row_weights, options, inp.batch_shape))


def register_class_weight(module: nn.Module, class_weight: Optional[torch.Tensor]) -> None:
    """Validates a loss module's (V,) class weights against its options and keeps them as the
    buffer ``class_weight`` (None allowed), so that they move with the module."""
    if class_weight is not None:
        _checks.tensor("class_weight", class_weight, _checks.FLOAT_DTYPES)
        module.options.case("data", class_weighted=True)
    module.register_buffer("class_weight", class_weight)


class TCSMLoss(nn.Module):
    """``fused_tcsm_loss`` with its options fixed (and validated) at construction;
    forward(logits, target, ...) takes the per-call tensors (teacher_logits, teacher_topk,
    weight, normalizer). ``class_weight`` (V,), as nn.CrossEntropyLoss's ``weight``, is given
    at construction and kept as a buffer (it moves with the module); the per-row ``weight``
    of forward is NOT a class weight."""

    def __init__(self, *, divergence="kl", objective="distrib", mask_id=None, temperature=1.0,
                 reduction="mean", ignore_index=-100, tail="zero", max_log_ratio=30.0,
                 softcap=None, lse_square_scale=0.0, label_smoothing=0.0, return_lse=False,
                 out_dtype=None, class_weight=None, inplace_backward=False, backend="auto",
                 check=None):
        super().__init__()
        self.options = LossOptions.from_arguments(locals())
        register_class_weight(self, class_weight)

    def forward(self, logits, target, *, teacher_logits=None, teacher_topk=None, weight=None,
                normalizer=None):
        return fused_tcsm_loss(logits, target, teacher_logits=teacher_logits,
                               teacher_topk=teacher_topk, weight=weight,
                               class_weight=self.class_weight, normalizer=normalizer,
                               **dataclasses.asdict(self.options))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.options).items())
