"""Top-k concrete scores of a teacher (docs/math.md 6), fused: one streaming pass over each row
keeps a running top-k and an online LSE, with no sort of the row and no (N, V) intermediate. One
``tcsm::topk_concrete_scores`` custom op (with a fake kernel, so ``torch.compile(fullgraph=True)``
and CUDA graphs see through it) dispatching to the C++ kernel (CPU) or the Triton kernel (CUDA,
or CPU under TRITON_INTERPRET=1)."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from .. import _backend, _checks, reference
from .custom_op import custom_op

if _backend.cpp_available():
    @torch.library.register_fake("tcsm::topk_scores_cpu")
    def _topk_scores_cpu_fake(teacher_logits, target, k, temperature):
        return _outputs_like(teacher_logits, k)


def _outputs_like(teacher_logits: torch.Tensor, k: int):
    rows = teacher_logits.shape[0]
    return (teacher_logits.new_empty(rows, k, dtype=torch.int64),
            teacher_logits.new_empty(rows, k, dtype=torch.float32),
            teacher_logits.new_empty(rows, dtype=torch.float32))


@custom_op("tcsm::topk_concrete_scores")
def _topk_scores_op(teacher_logits: torch.Tensor, target: torch.Tensor, k: int,
                    temperature: float, backend: str
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat rows: teacher_logits (N, V), target (N,) int64. Returns indices (N, k) int64,
    log-ratios (u_y - u_a) / tau (N, k) float32 and logsumexp(u / tau) (N,) float32."""
    if teacher_logits.stride(1) != 1:
        teacher_logits = teacher_logits.contiguous()
    if backend == "cpp":
        return torch.ops.tcsm.topk_scores_cpu(teacher_logits, target, k, temperature)
    # Imported on first use: triton is heavy, and on CPU the interpreter must be chosen
    # (TRITON_INTERPRET=1) before triton is first imported.
    from ..triton import topk_scores as triton_topk
    return triton_topk.topk_scores(teacher_logits, target, k, temperature)


@_topk_scores_op.register_fake
def _topk_scores_fake(teacher_logits, target, k, temperature, backend):
    return _outputs_like(teacher_logits, k)


def topk_concrete_scores(teacher_logits: torch.Tensor, target: torch.Tensor, k: int, *,
                         temperature: float = 1.0, correction: Optional[torch.Tensor] = None,
                         backend: str = "auto", check: Optional[bool] = None):
    """Top-k concrete scores of a teacher (docs/math.md 6), fused; the same results as
    ``reference.topk_concrete_scores``.

    teacher_logits u (..., V), any float dtype; target a (...) int64/int32, the reference
    (clean) tokens. Per row: indices (..., k) int64 of the k largest logits sorted by descending
    value (ties: lower index first), log-ratios ``(u_y - u_a) / temperature`` (..., k) float32
    (plus ``correction``: (..., V) is read at each chosen column, (..., k) with k < V is added
    position by position, e.g. math.md 6's autoregressive future term), and the row LSE
    ``logsumexp(u / temperature)`` (...) float32. float64 logits run the reference and return
    float64. The outputs feed ``fused_tcsm_loss(teacher_topk=(indices, log_ratios))``.

    ``check`` (default: on for CPU tensors, off on CUDA and while ``torch.compile`` traces)
    validates target ids and finite logits/correction. Unchecked, a target outside [0, V) gives
    NaN log-ratios for its row and is never read. ``backend``: "auto", "cpp", "triton" or
    "reference".
    """
    if check is None and torch.compiler.is_compiling():
        check = False
    flat_u, flat_target, flat_correction, batch_shape = _checks.topk_inputs(
        teacher_logits, target, k, temperature=temperature, correction=correction,
        backend=backend, check=check)
    chosen = _backend.resolve(backend, teacher_logits.device, teacher_logits.dtype)
    checked = _checks.resolve_check(check, teacher_logits.device)
    if chosen == "reference":
        return reference.topk_concrete_scores(teacher_logits, target, k, temperature=temperature,
                                              correction=correction, backend="reference",
                                              check=checked)
    indices, log_ratios, lse = _topk_scores_op(
        flat_u.detach(), flat_target.to(torch.int64).contiguous(), k, float(temperature), chosen)
    if flat_correction is not None:
        # O(N k): a (N, V) correction is read only at the chosen columns.
        per_column = flat_correction.shape[1] == flat_u.shape[1]
        picked = flat_correction.gather(1, indices) if per_column else flat_correction
        log_ratios = log_ratios + picked.to(torch.float32)
    _checks.topk_outputs(lse, log_ratios, flat_u, flat_correction, checked)
    return (indices.reshape(batch_shape + (k,)), log_ratios.reshape(batch_shape + (k,)),
            lse.reshape(batch_shape))


class TopKTarget(NamedTuple):
    """A top-K teacher distribution: ``fused_tcsm_loss(teacher_topk=TopKTarget(...))`` with the
    default ``objective="distrib"``. indices (..., K) int64, log_probs (..., K) float32."""

    indices: torch.Tensor
    log_probs: torch.Tensor


def topk_log_probs(teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0,
                   backend: str = "auto", check: Optional[bool] = None) -> TopKTarget:
    """The k most probable columns of q = softmax(teacher_logits / temperature) per row and
    their log-probabilities log q_y = u_y / tau - LSE(u / tau) (docs/math.md 6), from one
    streaming pass of the fused top-k op plus a gather of k logits per row.

    teacher_logits (..., V) any float dtype. Feed the result to
    ``fused_tcsm_loss(logits, x0, teacher_topk=topk_log_probs(u, 8))``.
    """
    _checks.tensor("teacher_logits", teacher_logits, _checks.FLOAT_DTYPES)
    if teacher_logits.dim() < 1:
        raise ValueError("teacher_logits must have shape (..., V)")
    anchor = torch.zeros(teacher_logits.shape[:-1], dtype=torch.int64,
                         device=teacher_logits.device)
    indices, _, lse = topk_concrete_scores(teacher_logits, anchor, k, temperature=temperature,
                                           backend=backend, check=False)
    # Checked mode in O(N): a NaN or +inf logit, or a row of only -inf, makes its LSE
    # non-finite; -inf entries (banned columns) are fine.
    if _checks.resolve_check(check, teacher_logits.device) and lse.numel():
        if not bool(torch.isfinite(lse).all()):
            row = int((~torch.isfinite(lse.reshape(-1))).nonzero()[0, 0])
            raise ValueError(f"teacher_logits row {row} holds NaN or +inf, or only -inf "
                             "(pass check=False to skip this check)")
    picked = teacher_logits.detach().gather(-1, indices)
    compute = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    log_probs = picked.to(compute) / temperature - lse.to(compute)[..., None]
    return TopKTarget(indices, log_probs)
