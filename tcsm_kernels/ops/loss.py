"""fused_tcsm_loss: TCSM losses (SPEC 4-5) with the gradient computed in the forward pass.

One kernel call per batch computes, for every row, the weighted loss and its gradient
d loss_i / d logits (C++ on CPU, Triton on CUDA); the gradient is kept — in a new buffer, or
written over the logits with ``inplace_backward=True`` — and backward only scales it by the
upstream gradient. Saved state beyond that buffer is O(N); there is no host sync on CUDA.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import _backend, _checks, reference


def _run_kernel(logits, target, weight, teacher_logits, topk_indices, topk_log_ratios, grad,
                divergence, objective, mask_id, temperature, ignore_index, tail, max_log_ratio,
                backend):
    """Weighted row losses (N,) float32; writes weight_i * d row_loss_i / d logits into grad."""
    args = (logits, target, weight, teacher_logits, topk_indices, topk_log_ratios, grad,
            divergence, objective, mask_id, temperature, ignore_index, tail, max_log_ratio)
    if backend == "cpp":
        return torch.ops.tcsm.tcsm_loss_cpu(*args)
    from ..triton.loss import tcsm_loss_rows
    return tcsm_loss_rows(*args)


@torch.library.custom_op("tcsm::tcsm_loss_rows", mutates_args=("grad",))
def _loss_rows(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
               teacher_logits: Optional[torch.Tensor], topk_indices: Optional[torch.Tensor],
               topk_log_ratios: Optional[torch.Tensor], grad: torch.Tensor, divergence: str,
               objective: str, mask_id: int, temperature: float, ignore_index: int, tail: str,
               max_log_ratio: float, backend: str) -> torch.Tensor:
    return _run_kernel(logits, target, weight, teacher_logits, topk_indices, topk_log_ratios,
                       grad, divergence, objective, mask_id, temperature, ignore_index, tail,
                       max_log_ratio, backend)


@torch.library.custom_op("tcsm::tcsm_loss_rows_inplace", mutates_args=("logits",))
def _loss_rows_inplace(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                       teacher_logits: Optional[torch.Tensor],
                       topk_indices: Optional[torch.Tensor],
                       topk_log_ratios: Optional[torch.Tensor], divergence: str, objective: str,
                       mask_id: int, temperature: float, ignore_index: int, tail: str,
                       max_log_ratio: float, backend: str) -> torch.Tensor:
    """As tcsm_loss_rows, with the gradient written over the logits themselves."""
    return _run_kernel(logits, target, weight, teacher_logits, topk_indices, topk_log_ratios,
                       logits, divergence, objective, mask_id, temperature, ignore_index, tail,
                       max_log_ratio, backend)


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
    def forward(ctx, logits, target, weight, teacher_logits, topk_indices, topk_log_ratios,
                options, inplace):
        if inplace:
            rows = torch.ops.tcsm.tcsm_loss_rows_inplace(
                logits, target, weight, teacher_logits, topk_indices, topk_log_ratios, *options)
            grad = logits
        else:
            grad = _gradient_buffer(logits)
            rows = torch.ops.tcsm.tcsm_loss_rows(
                logits, target, weight, teacher_logits, topk_indices, topk_log_ratios, grad,
                *options)
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


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """(N, V) with unit column stride, as the kernels read it."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def fused_tcsm_loss(logits, target, *, teacher_logits=None, teacher_topk=None, divergence="kl",
                    objective="distrib", weight=None, mask_id=None, temperature=1.0,
                    reduction="mean", ignore_index=-100, normalizer=None, tail="zero",
                    max_log_ratio=30.0, inplace_backward=False, backend="auto", check=None):
    """TCSM loss (SPEC 4-5) of logits (..., V) against clean tokens target (...), fused.

    Targets: data (default), a dense teacher ``teacher_logits`` (..., V) (constant: no gradient
    flows to it; cast to the logits' dtype) with ``objective`` "distrib" or "score", or a
    top-K teacher ``teacher_topk = (indices (..., K), log_ratios (..., K))`` (score objective,
    ``tail`` "zero" or "ignore"). ``divergence``: "kl" (cross-entropy), "is", "gkl" (= kl + is).
    ``weight`` (...) or broadcastable (e.g. (B, 1)); rows with target == ignore_index give 0.
    ``mask_id`` is excluded from the model (and teacher) distribution. ``reduction``: "none"
    (per-row float32), "sum", "mean" (over non-ignored rows, or / ``normalizer``).
    ``inplace_backward=True`` overwrites the logits with their gradient during the forward (the
    logits must not be used afterwards; saves an (N, V) buffer). ``check`` (default: on for CPU
    tensors, off on CUDA and under torch.compile) validates ids in range (O(N)) and raises on
    NaN/+inf logits of loss-carrying rows (read from the (N,) losses: no extra pass over V).
    ``backend``: "auto" (C++ on CPU, Triton on CUDA, reference for float64), "cpp",
    "triton", "reference". Returns float32.
    """
    inp = _checks.loss_inputs(
        logits, target, teacher_logits=teacher_logits, teacher_topk=teacher_topk,
        divergence=divergence, objective=objective, weight=weight, mask_id=mask_id,
        temperature=temperature, reduction=reduction, ignore_index=ignore_index,
        normalizer=normalizer, tail=tail, max_log_ratio=max_log_ratio, backend=backend,
        check=check)
    chosen = _backend.resolve(backend, logits.device, logits.dtype)
    if chosen == "reference":
        return reference.loss_from_inputs(
            inp, divergence=divergence, objective=objective, mask_id=mask_id,
            temperature=temperature, reduction=reduction, ignore_index=ignore_index,
            normalizer=normalizer, tail=tail, max_log_ratio=max_log_ratio, check=check)
    flat_logits = _as_rows(inp.logits)
    teacher = inp.teacher_logits
    if teacher is not None:
        teacher = _as_rows(teacher.to(flat_logits.dtype))
    topk_indices = topk_log_ratios = None
    if inp.topk_indices is not None:
        topk_indices = inp.topk_indices.to(torch.int64).contiguous()
        topk_log_ratios = inp.topk_log_ratios.to(torch.float32).contiguous()
    # The reduction's scale is folded into the row weights, so the kernel's gradient is already
    # d loss / d z and backward has nothing left to do for a unit upstream gradient.
    weight_rows = None if inp.weight is None else inp.weight.to(torch.float32)
    if reduction == "mean":
        denominator = normalizer
        if denominator is None:
            denominator = (inp.target != ignore_index).sum().clamp(min=1).to(torch.float32)
        if weight_rows is None:
            weight_rows = torch.ones(inp.target.shape, dtype=torch.float32, device=logits.device)
        weight_rows = weight_rows / denominator
    if weight_rows is not None:
        weight_rows = weight_rows.contiguous()
    options = (divergence, objective, -1 if mask_id is None else mask_id, float(temperature),
               ignore_index, tail, float(max_log_ratio), chosen)
    rows = _FusedTCSMLoss.apply(flat_logits, inp.target.to(torch.int64).contiguous(),
                                weight_rows, teacher, topk_indices, topk_log_ratios, options,
                                bool(inplace_backward))
    _checks.finite_rows(rows, (("logits", inp.logits), ("teacher_logits", inp.teacher_logits)),
                        _checks.resolve_check(check, logits.device))
    return rows.reshape(inp.batch_shape) if reduction == "none" else rows.sum()


class TCSMLoss(nn.Module):
    """``fused_tcsm_loss`` with its options fixed at construction; forward(logits, target, ...)
    takes the per-call tensors (teacher_logits, teacher_topk, weight, normalizer)."""

    def __init__(self, *, divergence="kl", objective="distrib", mask_id=None, temperature=1.0,
                 reduction="mean", ignore_index=-100, tail="zero", max_log_ratio=30.0,
                 inplace_backward=False, backend="auto", check=None):
        super().__init__()
        self.options = dict(divergence=divergence, objective=objective, mask_id=mask_id,
                            temperature=temperature, reduction=reduction,
                            ignore_index=ignore_index, tail=tail, max_log_ratio=max_log_ratio,
                            inplace_backward=inplace_backward, backend=backend, check=check)

    def forward(self, logits, target, *, teacher_logits=None, teacher_topk=None, weight=None,
                normalizer=None):
        return fused_tcsm_loss(logits, target, teacher_logits=teacher_logits,
                               teacher_topk=teacher_topk, weight=weight, normalizer=normalizer,
                               **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
