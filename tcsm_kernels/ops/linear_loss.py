"""fused_linear_tcsm_loss: the TCSM loss straight from hidden states and the LM head weight,
never materialising the (N, V) logits or their gradient.

Rows are processed in chunks: per chunk, logits = hidden_c @ weight.T (+ bias) go into one
reused (chunk, V) buffer, the row kernel of ``fused_tcsm_loss`` turns them in place into
d loss / d logits (C++ on CPU, Triton on CUDA), then
    grad_hidden_c  = g @ weight                 (N, D) in the hidden states' dtype
    grad_weight   += g.T @ hidden_c             (V, D) accumulated in float32
    grad_bias     += g.sum(0)                   (V,)   accumulated in float32
The matmuls are torch's (oneDNN/MKL on CPU, cuBLAS on CUDA). A dense teacher head
(teacher_hidden @ teacher_weight.T) is formed chunk by chunk too. The gradients are computed in
the forward; backward scales them by the (scalar) upstream gradient. For reduction="none" the
upstream gradient is per row, so backward runs the chunked pass again with the row weights
scaled by it (exact, at the cost of a second pass).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional, Tuple, Union

import torch
from torch import nn

from .. import _backend, _checks, reference
from ..loss_options import LossOptions, LossOutput
from .custom_op import custom_op
from .loss import (_row_weights, _run_kernel, kernel_class_weight, kernel_topk, reduced_z_loss,
                   register_class_weight)

# chunk_rows="auto": the (chunk, V) buffers of one chunk stay below this many bytes.
DEFAULT_CHUNK_BYTES = 256 * 2**20
_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10,
               "mib": 2**20, "gib": 2**30}


def chunk_row_count(chunk_rows, rows: int, vocab: int, dtype: torch.dtype,
                    dense_teacher: bool) -> int:
    """Rows per chunk: an int as given; "auto" or a byte budget ("512MiB", "1GB", an int in a
    str) so that the chunk's logits buffer (+ a teacher's, + a float32 copy of the gradient
    for bfloat16/float16) fits it; at least 1 and at most ``rows``."""
    if isinstance(chunk_rows, bool):
        raise TypeError("chunk_rows must be 'auto', a positive int or a byte budget such as "
                        "'256MiB'")
    if isinstance(chunk_rows, int):
        if chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be > 0, got {chunk_rows}")
        return max(1, min(chunk_rows, rows))
    if not isinstance(chunk_rows, str):
        raise TypeError("chunk_rows must be 'auto', a positive int or a byte budget such as "
                        f"'256MiB', got {type(chunk_rows).__name__}")
    if chunk_rows == "auto":
        budget = DEFAULT_CHUNK_BYTES
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?i?[bB]?)\s*", chunk_rows)
        if match is None or match.group(2).lower() not in _BYTE_UNITS:
            raise ValueError(f"chunk_rows={chunk_rows!r} is neither 'auto' nor a byte budget "
                             "such as '256MiB'")
        budget = float(match.group(1)) * _BYTE_UNITS[match.group(2).lower()]
        if budget <= 0:
            raise ValueError(f"chunk_rows budget must be > 0, got {chunk_rows!r}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_row = vocab * (itemsize * (2 if dense_teacher else 1) + (4 if itemsize < 4 else 0))
    return max(1, min(rows, int(budget // per_row)))


def _chunked_pass(hidden, weight, bias, target, row_weights, class_weight, teacher_logits,
                  teacher_hidden, teacher_weight, teacher_bias, topk_indices, topk_values,
                  options: LossOptions, backend: str, chunk: int, with_grads: bool):
    """Row losses (N,) float32, row LSEs ((N,) with ``return_lse``, else empty) and, if
    ``with_grads``, (grad_hidden (N, D) in hidden's dtype, grad_weight (V, D) float32,
    grad_bias (V,) float32 or None)."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    losses = hidden.new_empty(rows, dtype=torch.float32)
    lse = hidden.new_zeros(rows if options.return_lse else 0, dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if with_grads else None
    grad_weight = weight.new_zeros(weight.shape, dtype=torch.float32) if with_grads else None
    grad_bias = None
    if with_grads and bias is not None:
        grad_bias = bias.new_zeros(bias.shape, dtype=torch.float32)
    logits = hidden.new_empty(min(chunk, rows), vocab)
    teacher = None if teacher_hidden is None else hidden.new_empty(min(chunk, rows), vocab)
    low_precision = hidden.dtype != torch.float32
    for begin in range(0, rows, chunk):
        end = min(begin + chunk, rows)
        n = end - begin
        z = logits[:n]
        h = hidden[begin:end]
        if bias is None:
            torch.mm(h, weight.T, out=z)
        else:
            torch.addmm(bias, h, weight.T, out=z)
        teacher_c = None if teacher_logits is None else teacher_logits[begin:end]
        if teacher_hidden is not None:
            teacher_c = teacher[:n]
            tw = teacher_weight.to(hidden.dtype)
            if teacher_bias is None:
                torch.mm(teacher_hidden[begin:end].to(hidden.dtype), tw.T, out=teacher_c)
            else:
                torch.addmm(teacher_bias.to(hidden.dtype), teacher_hidden[begin:end].to(
                    hidden.dtype), tw.T, out=teacher_c)
        sl = slice(begin, end)
        losses[sl], lse_c = _run_kernel(
            z, target[sl], None if row_weights is None else row_weights[sl], class_weight,
            teacher_c, None if topk_indices is None else topk_indices[sl],
            None if topk_values is None else topk_values[sl], z, options, backend)
        if options.return_lse:
            lse[sl] = lse_c
        if not with_grads:
            continue
        torch.mm(z, weight, out=grad_hidden[sl])  # z now holds d loss / d logits
        g = z.float() if low_precision else z
        grad_weight.addmm_(g.T, h.float() if low_precision else h)
        if grad_bias is not None:
            grad_bias += g.sum(0)
    return losses, lse, grad_hidden, grad_weight, grad_bias


@custom_op("tcsm::linear_loss_rows")
def _linear_loss_rows(
        hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
        target: torch.Tensor, row_weights: Optional[torch.Tensor],
        class_weight: Optional[torch.Tensor], teacher_logits: Optional[torch.Tensor],
        teacher_hidden: Optional[torch.Tensor], teacher_weight: Optional[torch.Tensor],
        teacher_bias: Optional[torch.Tensor], topk_indices: Optional[torch.Tensor],
        topk_values: Optional[torch.Tensor], divergence: str, objective: str, tail: str,
        mask_id: int, temperature: float, ignore_index: int, max_log_ratio: float,
        softcap: float, lse_square_scale: float, label_smoothing: float, return_lse: bool,
        backend: str, chunk: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat rows: hidden (N, D), weight (V, D); the options flattened by
    ``LossOptions.op_args``. Returns the row losses (N,) float32, the row LSEs ((N,) with
    ``return_lse``, else empty) and the gradients for unit upstream gradient: hidden's (N, D),
    weight's (V, D) and bias's (V,) float32 (empty when there is no bias)."""
    options = LossOptions.from_op_args(divergence, objective, tail, mask_id, temperature,
                                       ignore_index, max_log_ratio, softcap, lse_square_scale,
                                       label_smoothing, return_lse, backend)
    losses, lse, grad_hidden, grad_weight, grad_bias = _chunked_pass(
        hidden, weight, bias, target, row_weights, class_weight, teacher_logits, teacher_hidden,
        teacher_weight, teacher_bias, topk_indices, topk_values, options, backend, chunk, True)
    if grad_bias is None:
        grad_bias = weight.new_empty(0, dtype=torch.float32)
    return losses, lse, grad_hidden, grad_weight, grad_bias


@_linear_loss_rows.register_fake
def _linear_loss_rows_fake(hidden, weight, bias, *args):
    return_lse = args[-3]
    rows = hidden.shape[0]
    return (hidden.new_empty(rows, dtype=torch.float32),
            hidden.new_empty(rows if return_lse else 0, dtype=torch.float32),
            torch.empty_like(hidden), weight.new_empty(weight.shape, dtype=torch.float32),
            weight.new_empty(0 if bias is None else bias.shape[0], dtype=torch.float32))


class _FusedLinearTCSMLoss(torch.autograd.Function):
    """Row losses (N,) and row LSEs (constant) from hidden (N, D) and weight (V, D): gradients
    from the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, row_weights, class_weight, teachers, op_args,
                chunk, per_row_upstream):
        losses, lse, grad_hidden, grad_weight, grad_bias = _linear_loss_rows(
            hidden, weight, bias, target, row_weights, class_weight, *teachers, *op_args, chunk)
        ctx.per_row_upstream = per_row_upstream
        ctx.has_bias = bias is not None
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.rerun = (op_args, chunk, teachers)
        ctx.mark_non_differentiable(lse)
        if per_row_upstream:  # backward reruns with scaled row weights
            ctx.save_for_backward(hidden, weight, bias, target, row_weights, class_weight)
        else:
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return losses, lse

    @staticmethod
    def backward(ctx, grad_rows, grad_lse):
        if ctx.per_row_upstream:
            hidden, weight, bias, target, row_weights, class_weight = ctx.saved_tensors
            op_args, chunk, teachers = ctx.rerun
            scaled = grad_rows.float() if row_weights is None else row_weights * grad_rows
            _, _, grad_hidden, grad_weight, grad_bias = _linear_loss_rows(
                hidden, weight, bias, target, scaled.contiguous(), class_weight, *teachers,
                *op_args, chunk)
        else:
            grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
            # The rows were summed (sum/mean), so every row's upstream gradient is the same
            # scalar; it scales the kept unit-upstream gradients in place (they are ours: a
            # second backward through the graph is not supported), so no (V, D) copy is made;
            # a tensor op, no host sync. On CPU a unit scale is seen and skips the passes.
            scale = grad_rows[0].float()
            unit = (scale.device.type == "cpu" and not torch.compiler.is_compiling()
                    and bool(scale == 1))
            if not unit:
                grad_hidden.mul_(scale.to(grad_hidden.dtype))
                grad_weight.mul_(scale)
                grad_bias.mul_(scale)
        weight_dtype, bias_dtype = ctx.dtypes
        return (grad_hidden, grad_weight.to(weight_dtype),
                grad_bias.to(bias_dtype) if ctx.has_bias else None,
                None, None, None, None, None, None, None)


def _linear_inputs(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                   teacher_logits):
    """Checks of the linear part; returns (batch shape, D, V)."""
    _checks.tensor("hidden", hidden, _checks.FLOAT_DTYPES)
    _checks.tensor("weight", weight, _checks.FLOAT_DTYPES)
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., D)")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, D), got {tuple(weight.shape)}")
    d, vocab = hidden.shape[-1], weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(f"weight has D={weight.shape[1]} columns but hidden has D={d}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}")
    _checks.same_device("weight", weight, hidden, "hidden")
    if bias is not None:
        _checks.tensor("bias", bias, _checks.FLOAT_DTYPES)
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias must have shape ({vocab},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but hidden has {hidden.dtype}")
        _checks.same_device("bias", bias, hidden, "hidden")
    given = [teacher_hidden is not None, teacher_weight is not None]
    if any(given) and not all(given):
        raise ValueError("teacher_hidden and teacher_weight go together (a teacher head)")
    if teacher_hidden is not None:
        if teacher_logits is not None:
            raise ValueError("pass at most one of teacher_logits and teacher_hidden")
        _checks.tensor("teacher_hidden", teacher_hidden, _checks.FLOAT_DTYPES)
        _checks.tensor("teacher_weight", teacher_weight, _checks.FLOAT_DTYPES)
        if teacher_weight.dim() != 2 or teacher_weight.shape[0] != vocab:
            raise ValueError(f"teacher_weight must have shape ({vocab}, D_t) (the student's "
                             f"V), got {tuple(teacher_weight.shape)}")
        if tuple(teacher_hidden.shape) != tuple(hidden.shape[:-1]) + (teacher_weight.shape[1],):
            raise ValueError(f"teacher_hidden must have shape {tuple(hidden.shape[:-1])} + "
                             f"(D_t={teacher_weight.shape[1]},), got "
                             f"{tuple(teacher_hidden.shape)}")
        for name, value in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
            _checks.same_device(name, value, hidden, "hidden")
        if teacher_bias is not None:
            _checks.tensor("teacher_bias", teacher_bias, _checks.FLOAT_DTYPES)
            if tuple(teacher_bias.shape) != (vocab,):
                raise ValueError(f"teacher_bias must have shape ({vocab},), got "
                                 f"{tuple(teacher_bias.shape)}")
            _checks.same_device("teacher_bias", teacher_bias, hidden, "hidden")
    elif teacher_bias is not None:
        raise ValueError("teacher_bias needs teacher_hidden and teacher_weight")
    return tuple(hidden.shape[:-1]), d, vocab


def fused_linear_tcsm_loss(
        hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
        bias: Optional[torch.Tensor] = None, teacher_logits: Optional[torch.Tensor] = None,
        teacher_topk: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        teacher_hidden: Optional[torch.Tensor] = None,
        teacher_weight: Optional[torch.Tensor] = None,
        teacher_bias: Optional[torch.Tensor] = None, divergence: str = "kl",
        objective: str = "distrib", weight_rows: Optional[torch.Tensor] = None,
        class_weight: Optional[torch.Tensor] = None, mask_id: Optional[int] = None,
        temperature: float = 1.0, reduction: str = "mean", ignore_index: int = -100,
        normalizer: Union[float, torch.Tensor, None] = None, tail: str = "zero",
        max_log_ratio: float = 30.0, softcap: Optional[float] = None,
        lse_square_scale: float = 0.0, label_smoothing: float = 0.0, return_lse: bool = False,
        out_dtype: Optional[torch.dtype] = None, backend: str = "auto",
        check: Optional[bool] = None,
        chunk_rows: Union[int, str] = "auto") -> Union[torch.Tensor, LossOutput]:
    """``fused_tcsm_loss(hidden @ weight.T + bias, target, ...)`` without the (N, V) logits.

    hidden (..., D) float32/bfloat16/float16; weight (V, D) the LM head (tied or not), same
    dtype; bias (V,) or None. Gradients flow to hidden, weight and bias (weight/bias gradients
    accumulated in float32, returned in the parameter's dtype). A dense teacher comes as
    ``teacher_logits`` (..., V) or as a head ``teacher_hidden`` (..., D_t) with
    ``teacher_weight`` (V, D_t) (+ ``teacher_bias``), whose logits are never materialised
    either (the teacher is constant); ``teacher_topk`` as in ``fused_tcsm_loss``.
    ``weight_rows`` is ``fused_tcsm_loss``'s per-row ``weight`` (renamed: ``weight`` is the
    head here; ``class_weight`` (V,) is the per-class one). Every other option is
    ``fused_tcsm_loss``'s, with the same meaning (``softcap``, ``lse_square_scale``,
    ``label_smoothing``, ``return_lse``, ``out_dtype``; no ``inplace_backward``: there are no
    logits to overwrite). ``chunk_rows``: rows per chunk, "auto" (the chunk's (chunk, V)
    buffers under 256 MiB) or a byte budget such as "512MiB".
    """
    options = LossOptions.from_arguments(locals())
    batch_shape, d, vocab = _linear_inputs(hidden, weight, bias, teacher_hidden, teacher_weight,
                                           teacher_bias, teacher_logits)
    # A zero-stride stand-in for the logits that are never formed: validation reads only its
    # shape, dtype and device.
    logits_like = hidden.new_zeros(()).expand(batch_shape + (vocab,))
    inp = _checks.loss_inputs(logits_like, target, teacher_logits=teacher_logits,
                              teacher_topk=teacher_topk, weight=weight_rows,
                              normalizer=normalizer, options=options,
                              class_weight=class_weight)
    if inp.kind == "data" and teacher_hidden is not None:
        inp = dataclasses.replace(inp, case=options.case("dense"))
    rows = math.prod(batch_shape)
    flat_hidden = hidden.reshape(rows, d)
    flat_teacher_hidden = None if teacher_hidden is None else teacher_hidden.reshape(rows, -1)
    chosen = _backend.resolve(backend, hidden.device, hidden.dtype)
    if chosen == "reference":
        logits = torch.nn.functional.linear(flat_hidden, weight, bias)
        teacher = inp.teacher_logits
        if flat_teacher_hidden is not None:
            teacher = torch.nn.functional.linear(flat_teacher_hidden, teacher_weight,
                                                 teacher_bias).detach()
        return reference.loss_from_inputs(
            dataclasses.replace(inp, logits=logits, teacher_logits=teacher), options, normalizer)
    chunk = chunk_row_count(chunk_rows, max(rows, 1), vocab, hidden.dtype,
                            teacher_logits is not None or teacher_hidden is not None)
    teacher = inp.teacher_logits
    if teacher is not None:
        teacher = _checks.unit_column_stride(teacher.to(hidden.dtype))
    topk_indices, topk_values = kernel_topk(inp)
    teachers = (teacher, flat_teacher_hidden, teacher_weight, teacher_bias, topk_indices,
                topk_values)
    row_weights = _row_weights(inp, options, normalizer)
    if rows == 0:
        losses = hidden.new_zeros(0, dtype=torch.float32) + 0 * hidden.sum() + 0 * weight.sum()
        lse = hidden.new_zeros(0, dtype=torch.float32)
    else:
        losses, lse = _FusedLinearTCSMLoss.apply(
            flat_hidden.contiguous(), weight.contiguous(), bias,
            inp.target.to(torch.int64).contiguous(), row_weights, kernel_class_weight(inp),
            teachers, options.op_args(chosen), chunk, reduction == "none")
    _checks.finite_rows(losses, (("hidden", flat_hidden), ("teacher_hidden", flat_teacher_hidden),
                                 ("teacher_logits", inp.teacher_logits),
                                 ("teacher_topk values", inp.topk_values)),
                        _checks.resolve_check(check, hidden.device))
    loss = losses.reshape(batch_shape) if reduction == "none" else losses.sum()
    if not return_lse:
        return reference.loss_result(loss, options)
    return reference.loss_result(loss, options, lse.reshape(batch_shape),
                                 reduced_z_loss(lse, row_weights, options, batch_shape))


class TCSMLinearLoss(nn.Module):
    """``fused_linear_tcsm_loss`` with its options fixed (and validated) at construction;
    forward(hidden, weight, target, ...) takes the per-call tensors. ``class_weight`` (V,) is
    given at construction and kept as a buffer, as in ``TCSMLoss``."""

    def __init__(self, *, divergence="kl", objective="distrib", mask_id=None, temperature=1.0,
                 reduction="mean", ignore_index=-100, tail="zero", max_log_ratio=30.0,
                 softcap=None, lse_square_scale=0.0, label_smoothing=0.0, return_lse=False,
                 out_dtype=None, class_weight=None, backend="auto", check=None,
                 chunk_rows="auto"):
        super().__init__()
        self.options = LossOptions.from_arguments(locals())
        register_class_weight(self, class_weight)
        chunk_row_count(chunk_rows, 1, 1, torch.float32, False)  # validate now
        self.chunk_rows = chunk_rows

    def forward(self, hidden, weight, target, *, bias=None, teacher_logits=None,
                teacher_topk=None, teacher_hidden=None, teacher_weight=None, teacher_bias=None,
                weight_rows=None, normalizer=None):
        options = dataclasses.asdict(self.options)
        options.pop("inplace_backward")
        return fused_linear_tcsm_loss(
            hidden, weight, target, bias=bias, teacher_logits=teacher_logits,
            teacher_topk=teacher_topk, teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight, teacher_bias=teacher_bias, weight_rows=weight_rows,
            class_weight=self.class_weight, normalizer=normalizer, chunk_rows=self.chunk_rows,
            **options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.options).items()
                         if k != "inplace_backward") + f", chunk_rows={self.chunk_rows!r}"
