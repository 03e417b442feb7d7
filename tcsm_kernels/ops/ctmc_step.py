"""Fused CTMC reverse step (docs/math.md 7): one pass over each row of logits draws x1, decides
the jump and computes the confidence outputs. One ``tcsm::ctmc_step`` custom op (with a fake
kernel, so ``torch.compile(fullgraph=True)`` and CUDA graphs see through it) dispatching to the
C++ kernel (CPU) or the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1)."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import _backend, _checks, reference
from .step_output import StepOutput, step_result
from .custom_op import custom_op

NO_MASK = -1

if _backend.cpp_available():
    @torch.library.register_fake("tcsm::ctmc_step_cpu")
    def _ctmc_step_cpu_fake(logits, x, jump, frozen, mask_id, temperature, seed, offset):
        return _step_outputs_like(logits, x)


def _step_outputs_like(logits: torch.Tensor, x: torch.Tensor):
    rows = logits.shape[0]
    return (x.new_empty(rows), x.new_empty(rows),
            *(logits.new_empty(rows, dtype=torch.float32) for _ in range(3)))


@custom_op("tcsm::ctmc_step")
def _ctmc_step_op(logits: torch.Tensor, x: torch.Tensor, jump: torch.Tensor,
                  frozen: Optional[torch.Tensor], mask_id: int, temperature: float, seed: int,
                  seed_tensor: Optional[torch.Tensor], offset: int, backend: str
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat step: logits (N, V), x (N,) int64, jump (N,) float64, frozen (N,) bool or None,
    mask_id (-1: none); the Philox seed is ``seed_tensor`` (one int64 on the logits' device)
    when given, else ``seed``. Returns (x_next int64, x1 int64, prob, margin, entropy float32),
    each (N,)."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if backend == "cpp":
        if seed_tensor is not None:
            seed = int(seed_tensor)  # a CPU tensor: reading it is no device sync
        return torch.ops.tcsm.ctmc_step_cpu(logits, x, jump, frozen, mask_id, temperature, seed,
                                            offset)
    # Imported on first use: triton is heavy, and on CPU the interpreter must be chosen
    # (TRITON_INTERPRET=1) before triton is first imported.
    from ..triton import ctmc_step as triton_step
    return triton_step.ctmc_step(logits, x, jump, frozen, mask_id, temperature,
                                 seed if seed_tensor is None else seed_tensor, offset)


@_ctmc_step_op.register_fake
def _ctmc_step_fake(logits, x, jump, frozen, mask_id, temperature, seed, seed_tensor, offset,
                    backend):
    return _step_outputs_like(logits, x)


def ctmc_step(logits: torch.Tensor, x: torch.Tensor, jump_prob: torch.Tensor, *,
              mask_id: Optional[int] = None, temperature: float = 1.0,
              frozen: Optional[torch.Tensor] = None, seed: Union[int, torch.Tensor] = 0,
              offset: int = 0, return_x1: bool = False, return_confidence: bool = False,
              backend: str = "auto", check: Optional[bool] = None
              ) -> Union[torch.Tensor, StepOutput]:
    """One reverse CTMC step (docs/math.md 7) from time t to s, fused: x_next (...) int64, or a
    ``StepOutput`` when ``return_x1`` or ``return_confidence``.

    logits (..., V), any float dtype; x (...) int64/int32 current tokens; jump_prob broadcastable
    to x (e.g. ``schedules`` jump probabilities, per row or per batch). Per row, x1 is drawn from
    softmax(logits / temperature) without the ``mask_id`` column, by inverse CDF with the row's
    Philox uniform keyed by (seed, offset, flat row index); the row moves to x1 when it may
    change (``mask_id`` given, masked path: x == mask_id; else uniform path: any row; never a
    ``frozen`` row) and its own jump uniform is below jump_prob. Advance ``offset`` (or ``seed``)
    every step. ``seed`` may also be a one-element int64 tensor on the logits' device, read by
    the kernel at launch: a captured CUDA graph then replays with the tensor's current value.
    Confidence outputs (float32): p(x1), top-1 minus top-2 probability, entropy.

    Same results as ``reference.ctmc_step`` up to float32 rounding of the probabilities: a token
    can differ only where the uniform falls within rounding of a CDF boundary. Each backend is
    reproducible: results depend on (seed, offset, row), not on thread count.

    ``check`` (default: on for CPU tensors, off on CUDA and while ``torch.compile`` traces)
    validates x ids and jump_prob in [0, 1] (O(N)) and raises on NaN/+inf logits, found from
    the (N,) entropies without an extra pass over (N, V). Unchecked, a row whose x is outside
    [0, V) is never read out of bounds and keeps its x (x_next = x); non-finite logits give
    valid but meaningless ids. ``backend``: "auto", "cpp", "triton" or "reference".
    """
    if check is None and torch.compiler.is_compiling():
        check = False
    flat_logits, flat_x, jump, flat_frozen, batch_shape, mask_id = _checks.step_inputs(
        logits, x, jump_prob, mask_id=mask_id, temperature=temperature, frozen=frozen, seed=seed,
        offset=offset, backend=backend, check=check)
    chosen = _backend.resolve(backend, logits.device, logits.dtype)
    if chosen == "reference":
        return reference.ctmc_step(logits, x, jump_prob, mask_id=mask_id, temperature=temperature,
                                   frozen=frozen, seed=seed, offset=offset, return_x1=return_x1,
                                   return_confidence=return_confidence, backend="reference",
                                   check=check)
    outputs = _ctmc_step_op(
        flat_logits.detach(), flat_x.to(torch.int64).contiguous(),
        jump.to(torch.float64).contiguous(),
        None if flat_frozen is None else flat_frozen.contiguous(),
        NO_MASK if mask_id is None else mask_id, float(temperature),
        *((0, seed.reshape(1)) if isinstance(seed, torch.Tensor) else (seed, None)), offset,
        chosen)
    # NaN/+inf logits make the row's entropy non-finite: checked from (N,), no pass over (N, V)
    _checks.finite_rows(outputs[4], (("logits", flat_logits),),
                        _checks.resolve_check(check, logits.device))
    return step_result(*outputs, batch_shape, return_x1, return_confidence)
