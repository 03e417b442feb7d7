"""Input validation shared by every public entry point.

Each check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (wrong value) and names
the offending argument, before any kernel runs. Value checks that need to look at tensor
contents (ids in range, finite logits) run only when ``check`` is true: on CPU that costs one
extra read of the data and no host sync; on CUDA it would sync, so it is off there by default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .loss_options import BACKENDS, DIVERGENCES, LossCase, LossOptions  # noqa: F401
from .schedules import LinearSchedule, Schedule, get_schedule

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT_DTYPES = FUSED_DTYPES + (torch.float64,)
INDEX_DTYPES = (torch.int64, torch.int32)


def choice(name: str, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def tensor(name: str, value, dtypes=None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {dtypes}, got {value.dtype}")


def same_device(name: str, value: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}")


def broadcast(name: str, value: torch.Tensor, batch_shape: tuple) -> torch.Tensor:
    """value broadcast to batch_shape; a ValueError naming it when it does not broadcast."""
    try:
        return torch.broadcast_to(value, batch_shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to "
                         f"{batch_shape}") from None


def rows_and_ids(name: str, logits, ids_name: str, ids) -> tuple:
    """Checks logits (..., V) and the ids (...) beside them; returns (V, batch shape)."""
    tensor(name, logits, FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., V) with V >= 1")
    batch_shape = tuple(logits.shape[:-1])
    tensor(ids_name, ids, INDEX_DTYPES)
    if tuple(ids.shape) != batch_shape:
        raise ValueError(f"{ids_name} must have shape {batch_shape}, got {tuple(ids.shape)}")
    same_device(ids_name, ids, logits, name)
    return logits.shape[-1], batch_shape


def positive_finite(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python number, got a tensor")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def column_id(name: str, value, vocab: int) -> Optional[int]:
    """An optional column index in [0, vocab)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if not 0 <= value < vocab:
        raise ValueError(f"{name}={value} is out of range for a vocabulary of {vocab}")
    return value


def ids_in_range(name: str, ids: torch.Tensor, vocab: int, ignore_index=None) -> None:
    if ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= vocab)
    if ignore_index is not None:
        bad &= ids != ignore_index
    if bool(bad.any()):
        first = ids[bad].flatten()[0].item()
        raise ValueError(f"{name} holds id {first} outside [0, {vocab})")


def finite(name: str, value: torch.Tensor) -> None:
    if value.numel() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or inf (pass check=False to skip this check)")


def resolve_check(check: Optional[bool], device: torch.device) -> bool:
    """Default: value checks on for CPU tensors (no sync), off on accelerators and while
    torch.compile traces (a data-dependent raise would break the graph)."""
    if torch.compiler.is_compiling():
        return False
    return device.type == "cpu" if check is None else bool(check)


def finite_rows(row_values: torch.Tensor, inputs, check: bool) -> None:
    """Checked mode in O(N): NaN or +inf in a row of the (N, V) inputs makes that row's (N,)
    result (a loss, an entropy) non-finite -- the kernels never produce one from finite inputs --
    so inspecting the result replaces a separate pass over (N, V). -inf logits are allowed.
    ``inputs``: (name, (N, V) tensor or None) pairs, searched for the culprit."""
    if not check or row_values.numel() == 0 or bool(torch.isfinite(row_values).all()):
        return
    row = int((~torch.isfinite(row_values)).nonzero()[0, 0])
    for name, values in inputs:
        if values is not None and bool((torch.isnan(values[row]) | (values[row] == float("inf"))).any()):
            raise ValueError(f"{name} contains NaN or +inf (row {row}); pass check=False to skip "
                             "this check")
    for name, values in inputs:
        if values is not None and bool((values[row] == float("-inf")).any()):
            raise ValueError(f"the result of row {row} is infinite: {name} has -inf entries, a "
                             "probability of 0 where the divergence needs one above 0 (e.g. the "
                             "target's or the teacher's token, or any column for is/gkl against "
                             "a -inf teacher); pass check=False to get the infinite value")
    raise ValueError(f"the result of row {row} is not finite although its inputs are; please "
                     "report this with the inputs")


@dataclass
class LossInputs:
    """Loss inputs flattened to rows: logits (N, V), target (N,), weight (N,) or None, a
    teacher (dense (N, V) logits, or top-K indices and values (N, K)), the table row, and the
    data target's class weights (V,) or None."""

    logits: torch.Tensor
    target: torch.Tensor
    weight: Optional[torch.Tensor]
    teacher_logits: Optional[torch.Tensor]
    topk_indices: Optional[torch.Tensor]
    topk_values: Optional[torch.Tensor]
    batch_shape: Tuple[int, ...]
    vocab: int
    case: LossCase
    class_weight: Optional[torch.Tensor] = None

    @property
    def kind(self) -> str:
        return self.case.target


# sum_S q may exceed 1 by rounding: by at most this much for float32/float64 log-probabilities
# (K terms of relative error ~1e-7), and this much for bfloat16/float16 ones.
TOPK_MASS_SLACK = {torch.float32: 1e-3, torch.float64: 1e-3, torch.bfloat16: 3e-2,
                   torch.float16: 3e-2}


def unit_column_stride(rows: torch.Tensor) -> torch.Tensor:
    """(N, V) with unit column stride, as every kernel reads it: the tensor or a copy."""
    return rows if rows.shape[-1] <= 1 or rows.stride(-1) == 1 else rows.contiguous()


def _topk_teacher(teacher_topk, batch_shape, vocab, logits):
    if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
        raise TypeError("teacher_topk must be a pair (indices (..., K), values (..., K)): "
                        "log-probabilities for objective='distrib', log-ratios for 'score'")
    indices, values = teacher_topk
    tensor("teacher_topk indices", indices, INDEX_DTYPES)
    tensor("teacher_topk values", values, FLOAT_DTYPES)
    if indices.dim() < 1 or tuple(indices.shape[:-1]) != batch_shape:
        raise ValueError(f"teacher_topk indices must have shape {batch_shape + ('K',)}, "
                         f"got {tuple(indices.shape)}")
    if values.shape != indices.shape:
        raise ValueError("teacher_topk values must have the shape of its indices "
                         f"{tuple(indices.shape)}, got {tuple(values.shape)}")
    k = indices.shape[-1]
    if k > vocab:
        raise ValueError(f"teacher_topk has K={k} > V={vocab}")
    same_device("teacher_topk indices", indices, logits, "logits")
    same_device("teacher_topk values", values, logits, "logits")
    rows = math.prod(batch_shape)
    return indices.reshape(rows, k), values.reshape(rows, k)


def _check_topk_log_probs(indices: torch.Tensor, log_probs: torch.Tensor, mask_id, tail) -> None:
    """Checked mode, top-K distribution target: finite log-probabilities of distinct columns
    whose mass does not exceed 1 (tail 'renormalize' only needs some mass)."""
    if log_probs.numel() == 0:
        return
    if bool((torch.isnan(log_probs) | (log_probs == float("inf"))).any()):
        raise ValueError("teacher_topk values (log-probabilities) contain NaN or +inf")
    ordered = indices.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        row = int((ordered[:, 1:] == ordered[:, :-1]).any(1).nonzero()[0, 0])
        raise ValueError(f"teacher_topk indices repeat a column in row {row}: a top-K "
                         "distribution needs distinct columns")
    counted = log_probs.float()
    if mask_id is not None:
        counted = counted.masked_fill(indices == mask_id, float("-inf"))
    log_mass = counted.logsumexp(dim=1)
    too_much = log_mass > math.log1p(TOPK_MASS_SLACK[log_probs.dtype])
    if bool(too_much.any()):
        row = int(too_much.nonzero()[0, 0])
        raise ValueError(
            f"teacher_topk values sum to {math.exp(float(log_mass[row])):.6g} > 1 as "
            f"probabilities (row {row}): objective='distrib' takes log-probabilities (e.g. "
            "from tcsm_kernels.topk_log_probs); pass objective='score' for log-ratios")
    if tail == "renormalize" and bool((log_mass == float("-inf")).any()):
        row = int((log_mass == float("-inf")).nonzero()[0, 0])
        raise ValueError(f"teacher_topk has no probability mass in row {row}: tail="
                         "'renormalize' divides by it")


def _row_weight(weight, batch_shape, vocab, logits) -> torch.Tensor:
    """The per-row ``weight`` broadcast to the rows; a (V,) one that does not broadcast is
    most likely meant as F.cross_entropy's per-class weight, and the error says so."""
    tensor("weight", weight, FLOAT_DTYPES)
    same_device("weight", weight, logits, "logits")
    try:
        return torch.broadcast_to(weight, batch_shape)
    except RuntimeError:
        hint = ""
        if tuple(weight.shape) == (vocab,):
            hint = ("; weight is PER ROW here, not F.cross_entropy's per-class weight: pass "
                    "per-class weights as class_weight=")
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not broadcast to "
                         f"{batch_shape}{hint}") from None


def _class_weight(class_weight, vocab, logits, check: bool) -> torch.Tensor:
    tensor("class_weight", class_weight, FLOAT_DTYPES)
    if tuple(class_weight.shape) != (vocab,):
        raise ValueError(f"class_weight must have shape (V,) = ({vocab},) (one weight per "
                         f"class, as F.cross_entropy's weight=), got {tuple(class_weight.shape)}")
    same_device("class_weight", class_weight, logits, "logits")
    if check:
        finite("class_weight", class_weight)
    return class_weight


def loss_inputs(logits, target, *, teacher_logits, teacher_topk, weight, normalizer,
                options: LossOptions, class_weight=None) -> LossInputs:
    """Validate the tensors of ``fused_tcsm_loss`` against its (validated) options and flatten
    them to rows; the target kind and options must form a row of ``LOSS_CASES``."""
    tensor("logits", logits, FLOAT_DTYPES)
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dimension (..., V)")
    vocab = logits.shape[-1]
    if vocab < 1:
        raise ValueError("logits must have V >= 1 columns")
    batch_shape = tuple(logits.shape[:-1])
    tensor("target", target, INDEX_DTYPES)
    if tuple(target.shape) != batch_shape:
        raise ValueError(f"target must have shape {batch_shape} (logits without the last dim), "
                         f"got {tuple(target.shape)}")
    same_device("target", target, logits, "logits")
    mask_id = column_id("mask_id", options.mask_id, vocab)
    if mask_id is not None and vocab < 2:
        raise ValueError("mask_id needs V >= 2 (the mask column is excluded)")
    if normalizer is not None:
        if isinstance(normalizer, torch.Tensor):
            if normalizer.numel() != 1:
                raise ValueError("normalizer must be a number or a one-element tensor")
            same_device("normalizer", normalizer, logits, "logits")
        else:
            positive_finite("normalizer", normalizer)

    if teacher_logits is not None and teacher_topk is not None:
        raise ValueError("pass at most one of teacher_logits and teacher_topk")
    target_kind = "dense" if teacher_logits is not None else (
        "topk" if teacher_topk is not None else "data")
    case = options.case(target_kind, class_weighted=class_weight is not None)
    checked = resolve_check(options.check, logits.device)
    if class_weight is not None:
        class_weight = _class_weight(class_weight, vocab, logits, checked)
    rows = math.prod(batch_shape)
    topk_indices = topk_values = None
    if teacher_logits is not None:
        tensor("teacher_logits", teacher_logits, FLOAT_DTYPES)
        if teacher_logits.shape != logits.shape:
            raise ValueError(f"teacher_logits must have the shape of logits {tuple(logits.shape)},"
                             f" got {tuple(teacher_logits.shape)}")
        same_device("teacher_logits", teacher_logits, logits, "logits")
        teacher_logits = teacher_logits.reshape(rows, vocab)
    elif teacher_topk is not None:
        topk_indices, topk_values = _topk_teacher(teacher_topk, batch_shape, vocab, logits)

    if weight is not None:
        weight = _row_weight(weight, batch_shape, vocab, logits).reshape(rows)

    flat_logits = logits.reshape(rows, vocab)
    flat_target = target.reshape(rows)
    if checked:
        ids_in_range("target", flat_target, vocab, options.ignore_index)
        if mask_id is not None and bool(((flat_target == mask_id)).any()):
            raise ValueError(f"target holds mask_id={mask_id} on a row that is not ignored; "
                             "targets are clean tokens (use ignore_index or weight=0)")
        if topk_indices is not None:
            ids_in_range("teacher_topk indices", topk_indices, vocab)
            if case.objective == "distrib":
                _check_topk_log_probs(topk_indices, topk_values, mask_id, options.tail)
            else:
                finite("teacher_topk values", topk_values)
        if weight is not None:
            finite("weight", weight)
    return LossInputs(flat_logits, flat_target, weight, teacher_logits, topk_indices,
                      topk_values, batch_shape, vocab, case, class_weight)


def python_int(name: str, value) -> int:
    """``value`` when it is a Python int (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def integer(name: str, value, minimum: int) -> int:
    """A Python int >= minimum."""
    if python_int(name, value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def philox_int(name: str, value) -> int:
    """A Philox seed or offset given as a Python int: in [0, 2**63)."""
    if not 0 <= python_int(name, value) < 2**63:
        raise ValueError(f"{name} must be in [0, 2**63), got {value}")
    return value


def philox_seed(seed, device: torch.device, check=None):
    """``seed``: an int in [0, 2**63), or a one-element int64 tensor on ``device`` holding one
    (read by the kernel at launch, so a captured CUDA graph replays with its current value; its
    range is checked in checked mode only, which on CUDA would be a host sync)."""
    if not isinstance(seed, torch.Tensor):
        return philox_int("seed", seed)
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError("seed must be an int or a one-element int64 tensor, got a "
                        f"{seed.dtype} tensor of shape {tuple(seed.shape)}")
    if seed.device != device:
        raise ValueError(f"seed is on {seed.device} but logits is on {device}")
    if resolve_check(check, device) and not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {int(seed)}")
    return seed


def step_inputs(logits, x, jump_prob, *, mask_id, temperature, frozen, seed, offset, backend,
                check=None):
    """Validate ``ctmc_step`` arguments; returns (logits (N, V), x (N,), jump (N,), frozen (N,)|None)."""
    vocab, batch_shape = rows_and_ids("logits", logits, "x", x)
    tensor("jump_prob", jump_prob, FLOAT_DTYPES)
    same_device("jump_prob", jump_prob, logits, "logits")
    jump = broadcast("jump_prob", jump_prob, batch_shape)
    mask_id = column_id("mask_id", mask_id, vocab)
    if mask_id is not None and vocab < 2:
        raise ValueError("mask_id needs V >= 2 (the mask column is excluded from x1)")
    positive_finite("temperature", temperature)
    philox_seed(seed, logits.device, check)
    philox_int("offset", offset)
    choice("backend", backend, BACKENDS)
    if frozen is not None:
        tensor("frozen", frozen, (torch.bool,))
        same_device("frozen", frozen, logits, "logits")
        frozen = broadcast("frozen", frozen, batch_shape)
    rows = math.prod(batch_shape)
    flat_logits = logits.reshape(rows, vocab)
    flat_x = x.reshape(rows)
    flat_jump = jump.reshape(rows)
    if resolve_check(check, logits.device):
        ids_in_range("x", flat_x, vocab)
        if flat_jump.numel() and bool(((flat_jump < 0) | (flat_jump > 1) | flat_jump.isnan()).any()):
            raise ValueError("jump_prob must lie in [0, 1]")
    return flat_logits, flat_x, flat_jump, (None if frozen is None else frozen.reshape(rows)), \
        batch_shape, mask_id


def topk_inputs(teacher_logits, target, k, *, temperature, correction, backend, check=None):
    """Validate ``topk_concrete_scores`` arguments; returns rows views."""
    vocab, batch_shape = rows_and_ids("teacher_logits", teacher_logits, "target", target)
    if not 1 <= python_int("k", k) <= vocab:
        raise ValueError(f"k must be in [1, V={vocab}], got {k}")
    positive_finite("temperature", temperature)
    choice("backend", backend, BACKENDS)
    rows = math.prod(batch_shape)
    if correction is not None:
        tensor("correction", correction, FLOAT_DTYPES)
        same_device("correction", correction, teacher_logits, "teacher_logits")
        if tuple(correction.shape) not in (batch_shape + (vocab,), batch_shape + (k,)):
            raise ValueError(f"correction must have shape {batch_shape + (vocab,)} or "
                             f"{batch_shape + (k,)}, got {tuple(correction.shape)}")
        correction = correction.reshape(rows, correction.shape[-1])
    flat_u = teacher_logits.reshape(rows, vocab)
    flat_target = target.reshape(rows)
    if resolve_check(check, teacher_logits.device):
        ids_in_range("target", flat_target, vocab)
    return flat_u, flat_target, correction, batch_shape


def topk_outputs(lse: torch.Tensor, log_ratios: torch.Tensor, teacher_logits: torch.Tensor,
                 correction: Optional[torch.Tensor], check: bool) -> None:
    """Checked mode of ``topk_concrete_scores`` in O(N k): a NaN or +inf teacher logit, a
    non-finite correction at a chosen column, or a -inf target logit makes the row's LSE or
    log-ratios non-finite, so the (N,) and (N, k) outputs are inspected instead of a separate
    pass over (N, V). teacher_logits (N, V), correction as given (N, V) / (N, k) or None."""
    if not check or lse.numel() == 0:
        return
    bad = ~torch.isfinite(lse) | ~torch.isfinite(log_ratios).all(1)
    if not bool(bad.any()):
        return
    row = int(bad.nonzero()[0, 0])
    values = teacher_logits[row]
    if bool((torch.isnan(values) | (values == float("inf"))).any()):
        raise ValueError(f"teacher_logits contains NaN or +inf (row {row}); pass check=False "
                         "to skip this check")
    if correction is not None and not bool(torch.isfinite(correction[row]).all()):
        raise ValueError(f"correction contains NaN or inf (row {row}); pass check=False to "
                         "skip this check")
    raise ValueError(f"teacher_logits row {row}: the target's logit (or the whole row) is -inf, "
                     "so its log-ratios are infinite; pass check=False to get them")


# ----------------------------------------------------------------------------- samplers, processes

def callable_as(name: str, value, call: str) -> None:
    """A callable; ``call`` shows how it is called (for the message)."""
    if not callable(value):
        raise TypeError(f"{name} must be callable as {call}, got {type(value).__name__}")


def token_matrix(name: str, value, shape: str = "(B, L)", *, empty_ok: bool = True
                 ) -> torch.Tensor:
    """Token ids of shape (B, L) (``shape`` names the dimensions), int64 or int32."""
    tensor(name, value, INDEX_DTYPES)
    if value.dim() != 2:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    if not empty_ok and value.numel() == 0:
        raise ValueError(f"{name} must be non-empty")
    return value


def bool_like(name: str, value, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """An optional bool tensor with the shape and device of ``like``; None: all False."""
    if value is None:
        return torch.zeros_like(like, dtype=torch.bool)
    tensor(name, value, (torch.bool,))
    same_device(name, value, like, like_name)
    if value.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, "
                         f"got {tuple(value.shape)}")
    return value


def schedule(value) -> Schedule:
    """A Schedule, a schedule name (``schedules.get_schedule``) or None (linear)."""
    if value is None:
        return LinearSchedule()
    if isinstance(value, str):
        return get_schedule(value)
    if not isinstance(value, Schedule):
        raise TypeError("schedule must be a tcsm_kernels.schedules.Schedule, a schedule name or "
                        f"None, got {type(value).__name__}")
    return value


def cuda_graph_flag(value, x: torch.Tensor) -> bool:
    """A sampler's ``cuda_graph``: a bool, True only for CUDA tensors x."""
    if not isinstance(value, bool):
        raise TypeError(f"cuda_graph must be a bool, got {type(value).__name__}")
    if value and x.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs CUDA tensors; x_init is on {x.device}")
    return value


def denoiser_logits(logits, x: torch.Tensor, min_vocab: int) -> None:
    """A sampler's denoiser output for x (B, L): float logits (B, L, V) with V >= min_vocab (the
    mask column, when there is one, must be a column); in checked mode also x's ids below V
    (named x_init, the sampler's argument)."""
    if not isinstance(logits, torch.Tensor) or logits.dtype not in FLOAT_DTYPES:
        raise TypeError("model must return a floating-point tensor of logits (B, L, V), got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(x.shape):
        raise ValueError(f"model must return logits of shape {tuple(x.shape) + ('V',)}, got "
                         f"{tuple(logits.shape)}")
    if logits.shape[2] < min_vocab:
        raise ValueError(f"model returned V={logits.shape[2]} columns but at least {min_vocab} "
                         "are needed (mask_id must be a column of the logits)")
    if resolve_check(None, x.device):
        ids_in_range("x_init", x, logits.shape[2])


def process_inputs(name: str, ids, t, vocab_size: int) -> torch.Tensor:
    """A forward process's tokens ids (B, ...) in [0, vocab_size) (checked on every device) and
    times t, one per sequence (B,) or one for all, in [0, 1]; returns t as (B, 1, ...) floats,
    broadcasting over ids."""
    tensor(name, ids, INDEX_DTYPES)
    if ids.dim() < 1:
        raise ValueError(f"{name} must have shape (B, ...)")
    ids_in_range(name, ids, vocab_size)
    t = torch.as_tensor(t, device=ids.device)
    if not t.is_floating_point():
        t = t.float()
    if t.dim() == 0:
        t = t.expand(ids.shape[0])
    if t.shape != (ids.shape[0],):
        raise ValueError(f"t must have shape ({ids.shape[0]},) (one time per sequence), "
                         f"got {tuple(t.shape)}")
    if t.numel() and (bool((t < 0).any()) or bool((t > 1).any())):
        raise ValueError("t must lie in [0, 1]")
    return t.reshape((-1,) + (1,) * (ids.dim() - 1))
