"""fused_tcsm_loss: TCSM losses (SPEC 4-5) with the gradient computed in the forward pass.

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
from ..loss_options import LossOptions


def _run_kernel(logits, target, weight, teacher_logits, topk_indices, topk_values, grad,
                options: LossOptions, backend: str) -> torch.Tensor:
    """Weighted row losses (N,) float32; writes weight_i * d row_loss_i / d logits into grad."""
    tensors = (logits, target, weight, teacher_logits, topk_indices, topk_values, grad)
    if backend == "cpp":
        return torch.ops.tcsm.tcsm_loss_cpu(*tensors, *options.op_args(backend)[:-1])
    from ..triton.loss import tcsm_loss_rows
    return tcsm_loss_rows(*tensors, options)


@torch.library.custom_op("tcsm::tcsm_loss_rows", mutates_args=("grad",))
def _loss_rows(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
               teacher_logits: Optional[torch.Tensor], topk_indices: Optional[torch.Tensor],
               topk_values: Optional[torch.Tensor], grad: torch.Tensor, divergence: str,
               objective: str, tail: str, mask_id: int, temperature: float, ignore_index: int,
               max_log_ratio: float, backend: str) -> torch.Tensor:
    """The options arrive flattened by ``LossOptions.op_args`` (a custom op takes no object)."""
    options = LossOptions.from_op_args(divergence, objective, tail, mask_id, temperature,
                                       ignore_index, max_log_ratio, backend)
    return _run_kernel(logits, target, weight, teacher_logits, topk_indices, topk_values, grad,
                       options, backend)


@torch.library.custom_op("tcsm::tcsm_loss_rows_inplace", mutates_args=("logits",))
def _loss_rows_inplace(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                       teacher_logits: Optional[torch.Tensor],
                       topk_indices: Optional[torch.Tensor], topk_values: Optional[torch.Tensor],
                       divergence: str, objective: str, tail: str, mask_id: int,
                       temperature: float, ignore_index: int, max_log_ratio: float,
                       backend: str) -> torch.Tensor:
    """As tcsm_loss_rows, with the gradient written over the logits themselves."""
    options = LossOptions.from_op_args(divergence, objective, tail, mask_id, temperature,
                                       ignore_index, max_log_ratio, backend)
    return _run_kernel(logits, target, weight, teacher_logits, topk_indices, topk_values, logits,
                       options, backend)


@_loss_rows.register_fake
def _loss_rows_fake(logits, *args):
    return logits.new_empty(logits.shape[:1], dtype=torch.float32)


@_loss_rows_inplace.register_fake
def _loss_rows_inplace_fake(logits, *args):
    return logits.new_empty(logits.shape[:1], dtype=torch.float32)


if _backend.cpp_available():
    @torch.library.register_fake("tcsm::empty_hugepage_cpu")
    def _empty_hugepage_fake(size, dtype):
        return torch.empty(size, dtype=dtype)


def _gradient_buffer(logits: torch.Tensor) -> torch.Tensor:
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


class _FusedTCSMLoss(torch.autograd.Function):
    """Row losses (N,) from logits (N, V); backward = kept gradient * per-row upstream grad."""

    @staticmethod
    def forward(ctx, logits, target, weight, teacher_logits, topk_indices, topk_values,
                op_args, inplace):
        if inplace:
            rows = torch.ops.tcsm.tcsm_loss_rows_inplace(
                logits, target, weight, teacher_logits, topk_indices, topk_values, *op_args)
            grad = logits
        else:
            grad = _gradient_buffer(logits)
            rows = torch.ops.tcsm.tcsm_loss_rows(
                logits, target, weight, teacher_logits, topk_indices, topk_values, grad,
                *op_args)
        ctx.save_for_backward(grad)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        (grad,) = ctx.saved_tensors
        # d total / d z = sum_i grad_rows_i * d loss_i / d z: scale the kept rows in place, in
        # float32 before rounding (the buffer is ours; a second backward through the same graph
        # is not supported). On CPU a unit upstream gradient (the common loss.backward()) is
        # seen without a device sync and skips the pass over (N, V).
        unit = (grad_rows.device.type == "cpu" and not torch.compiler.is_compiling()
                and bool((grad_rows == 1).all()))
        if not unit:
            grad.mul_(grad_rows[:, None])
        return grad, None, None, None, None, None, None, None


def _row_weights(inp: _checks.LossInputs, options: LossOptions, normalizer) -> Optional[torch.Tensor]:
    """(N,) float32 row weights with the reduction's scale folded in, so the kernel's gradient
    is already d loss / d z and backward has nothing left to do for a unit upstream gradient."""
    weight_rows = None if inp.weight is None else inp.weight.to(torch.float32)
    if options.reduction == "mean":
        denominator = normalizer
        if denominator is None:
            active = inp.target != options.ignore_index
            denominator = active.sum().clamp(min=1).to(torch.float32)
        if weight_rows is None:
            weight_rows = torch.ones(inp.target.shape, dtype=torch.float32,
                                     device=inp.logits.device)
        weight_rows = weight_rows / denominator
    return None if weight_rows is None else weight_rows.contiguous()


def fused_rows(inp: _checks.LossInputs, options: LossOptions, backend: str,
               normalizer=None) -> torch.Tensor:
    """The weighted row losses (N,) float32 of validated inputs on a fused backend,
    differentiable in ``inp.logits`` (the gradient is computed here and kept)."""
    flat_logits = _checks.unit_column_stride(inp.logits)
    teacher = inp.teacher_logits
    if teacher is not None:
        teacher = _checks.unit_column_stride(teacher.to(flat_logits.dtype))
    topk_indices = topk_values = None
    if inp.topk_indices is not None:
        topk_indices = inp.topk_indices.to(torch.int64).contiguous()
        topk_values = inp.topk_values.to(torch.float32).contiguous()
    return _FusedTCSMLoss.apply(flat_logits, inp.target.to(torch.int64).contiguous(),
                                _row_weights(inp, options, normalizer), teacher, topk_indices,
                                topk_values, options.op_args(backend), options.inplace_backward)


def _refuse_inplace_on_leaf(logits: torch.Tensor, options: LossOptions) -> None:
    if options.inplace_backward and logits.is_leaf and logits.requires_grad:
        raise RuntimeError("inplace_backward=True would overwrite logits, a leaf tensor that "
                           "requires grad (as torch refuses in-place ops on such leaves); pass "
                           "the logits as an activation (the output of the LM head) or use "
                           "inplace_backward=False")


def fused_tcsm_loss(logits: torch.Tensor, target: torch.Tensor, *,
                    teacher_logits: Optional[torch.Tensor] = None,
                    teacher_topk: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                    divergence: str = "kl", objective: str = "distrib",
                    weight: Optional[torch.Tensor] = None, mask_id: Optional[int] = None,
                    temperature: float = 1.0, reduction: str = "mean", ignore_index: int = -100,
                    normalizer: Union[float, torch.Tensor, None] = None, tail: str = "zero",
                    max_log_ratio: float = 30.0, inplace_backward: bool = False,
                    backend: str = "auto", check: Optional[bool] = None) -> torch.Tensor:
    """TCSM loss (docs/math.md 4-5) of logits (..., V) against clean tokens target (...), fused.

    Targets (``tcsm_kernels.LOSS_CASES`` lists each with its divergences):
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
    ``weight`` (...) or broadcastable (e.g. (B, 1)) is a PER-ROW weight (not torch's per-class
    ``weight=``); rows with target == ignore_index give 0. ``mask_id`` is excluded from the
    model (and teacher) distribution. ``reduction``: "none" (per-row float32), "sum", "mean" =
    sum / (number of non-ignored rows), whatever the weights (MDLM-style weight=is_masked thus
    divides by all rows; pass ``normalizer`` for another denominator).
    ``inplace_backward=True`` overwrites the logits with their gradient during the forward (the
    logits must not be used afterwards; saves an (N, V) buffer; refused on a leaf that requires
    grad). ``check`` (default: on for CPU tensors, off on CUDA and under torch.compile)
    validates ids (O(N)) and top-K log-probabilities (O(N K)) and raises on NaN/+inf logits of
    loss-carrying rows (read from the (N,) losses: no extra pass over V).
    ``backend``: "auto" (C++ on CPU, Triton on CUDA, reference for float64), "cpp", "triton",
    "reference". Returns float32.
    """
    options = LossOptions(divergence=divergence, objective=objective, mask_id=mask_id,
                          temperature=temperature, reduction=reduction,
                          ignore_index=ignore_index, tail=tail, max_log_ratio=max_log_ratio,
                          inplace_backward=inplace_backward, backend=backend, check=check)
    inp = _checks.loss_inputs(logits, target, teacher_logits=teacher_logits,
                              teacher_topk=teacher_topk, weight=weight, normalizer=normalizer,
                              options=options)
    chosen = _backend.resolve(backend, logits.device, logits.dtype)
    if chosen == "reference":
        return reference.loss_from_inputs(inp, options, normalizer)
    _refuse_inplace_on_leaf(logits, options)
    rows = fused_rows(inp, options, chosen, normalizer)
    _checks.finite_rows(rows, (("logits", inp.logits), ("teacher_logits", inp.teacher_logits),
                               ("teacher_topk values", inp.topk_values)),
                        _checks.resolve_check(check, logits.device))
    return rows.reshape(inp.batch_shape) if reduction == "none" else rows.sum()


class TCSMLoss(nn.Module):
    """``fused_tcsm_loss`` with its options fixed (and validated) at construction;
    forward(logits, target, ...) takes the per-call tensors (teacher_logits, teacher_topk,
    weight, normalizer)."""

    def __init__(self, *, divergence="kl", objective="distrib", mask_id=None, temperature=1.0,
                 reduction="mean", ignore_index=-100, tail="zero", max_log_ratio=30.0,
                 inplace_backward=False, backend="auto", check=None):
        super().__init__()
        self.options = LossOptions(divergence=divergence, objective=objective, mask_id=mask_id,
                                   temperature=temperature, reduction=reduction,
                                   ignore_index=ignore_index, tail=tail,
                                   max_log_ratio=max_log_ratio,
                                   inplace_backward=inplace_backward, backend=backend,
                                   check=check)

    def forward(self, logits, target, *, teacher_logits=None, teacher_topk=None, weight=None,
                normalizer=None):
        return fused_tcsm_loss(logits, target, teacher_logits=teacher_logits,
                               teacher_topk=teacher_topk, weight=weight, normalizer=normalizer,
                               **dataclasses.asdict(self.options))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.options).items())
