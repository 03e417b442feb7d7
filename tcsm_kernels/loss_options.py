"""The loss's options as one validated object, and the one table of what the loss computes.

``LOSS_CASES`` lists every (target, objective, tail) the loss accepts with the divergences each
allows, the options each allows (z-loss and the returned LSE, label smoothing, class weights)
and the section of docs/math.md that defines it. Validation (``LossOptions.case``), the
documentation table (``cases_markdown``) and the tests all read this table, so a new case is
one new row here plus its kernels.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch

DIVERGENCES = ("kl", "is", "gkl")
OBJECTIVES = ("distrib", "score")
TAILS = ("zero", "ignore", "renormalize")
REDUCTIONS = ("none", "sum", "mean")
BACKENDS = ("auto", "reference", "cpp", "triton")
TARGETS = ("data", "dense", "topk")
# The kernels compute in float32: exp(80) = 5.5e34 leaves room for sums of such terms.
MAX_LOG_RATIO_LIMIT = 80.0
OUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LossCase:
    """One row of the table: a target kind, objective and tail, the divergences allowed, and
    which of them allow the options that only some losses define.
    ``objective``/``tail`` None: the option does not apply (any value is accepted, unused).
    ``lse_divergences``: those whose loss forms the student's log-sum-exp, so that the z-loss
    (``lse_square_scale``) and ``return_lse`` come with it; the others are invariant to a
    shift of the logits and never form it. ``smoothing_divergences``: those that take
    ``label_smoothing``. ``class_weight``: whether per-class weights apply (the data target,
    whose row has one class, the clean token). ``softcap`` applies to every case."""

    target: str
    objective: Optional[str]
    tail: Optional[str]
    divergences: Tuple[str, ...]
    section: str  # docs/math.md section
    computes: str
    lse_divergences: Tuple[str, ...] = ()
    smoothing_divergences: Tuple[str, ...] = ()
    class_weight: bool = False


LOSS_CASES: Tuple[LossCase, ...] = (
    LossCase("data", None, None, ("kl", "is", "gkl"), "4.1",
             "Monte-Carlo estimate from the clean token a ~ q_data: kl is cross-entropy",
             lse_divergences=("kl", "is", "gkl"), smoothing_divergences=("kl",),
             class_weight=True),
    LossCase("dense", "distrib", None, ("kl", "is", "gkl"), "4.2",
             "divergence of q = softmax(u / tau) and p, analytic over the vocabulary",
             lse_divergences=("kl", "is", "gkl")),
    LossCase("dense", "score", None, ("is", "gkl"), "4.3",
             "ratio divergence against reference token a; unbiased only for a ~ q",
             lse_divergences=("gkl",)),
    LossCase("topk", "distrib", "zero", ("kl", "is", "gkl"), "4.5",
             "q on its K entries, the rest 1 - sum q as one cell: a divergence on S + {rest}",
             lse_divergences=("kl", "is", "gkl")),
    LossCase("topk", "distrib", "renormalize", ("kl",), "4.5",
             "q / sum_S q on its K entries, 0 elsewhere (is/gkl would be infinite there)",
             lse_divergences=("kl",)),
    LossCase("topk", "score", "zero", ("is", "gkl"), "4.4",
             "ratios exp(rho) on S, 0 target ratio on the rest; unbiased only for a ~ q",
             lse_divergences=("gkl",)),
    LossCase("topk", "score", "ignore", ("is", "gkl"), "4.4",
             "ratios exp(rho) on S; columns outside S are not counted"),
)


def find_case(target: str, objective: str, tail: str) -> Optional[LossCase]:
    """The row for a target kind with these options, or None."""
    for case in LOSS_CASES:
        if (case.target == target and case.objective in (None, objective)
                and case.tail in (None, tail)):
            return case
    return None


def _case_error(target: str, divergence: str, objective: str, tail: str) -> str:
    rows = [c for c in LOSS_CASES if c.target == target]
    allowed = "; ".join(
        " ".join(part for part in (c.objective and f"objective={c.objective!r}",
                                   c.tail and f"tail={c.tail!r}") if part)
        + f": {', '.join(c.divergences)}" for c in rows)
    return (f"divergence={divergence!r} with objective={objective!r}, tail={tail!r} is not "
            f"defined for a {target} target (docs/math.md); allowed: {allowed}")


def cases_markdown() -> str:
    """The table as markdown, for the docs."""
    lines = ["| target | objective | tail | divergences | z-loss, return_lse | label_smoothing "
             "| class_weight | math.md | what it computes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in LOSS_CASES:
        lines.append(f"| {c.target} | {c.objective or 'any'} | {c.tail or '-'} | "
                     f"{', '.join(c.divergences)} | {', '.join(c.lse_divergences) or '-'} | "
                     f"{', '.join(c.smoothing_divergences) or '-'} | "
                     f"{'yes' if c.class_weight else '-'} | §{c.section} | {c.computes} |")
    return "\n".join(lines)


class LossOutput(NamedTuple):
    """``fused_tcsm_loss(..., return_lse=True)``: the loss and what its row pass computed.

    ``loss``: as without ``return_lse`` (the z-loss included). ``lse`` (...) float32: each
    row's log-sum-exp of the student logits (after ``softcap``, without the mask column); 0 on
    rows that carry no loss (ignored, or weight 0), which the kernel does not read. Constant:
    no gradient flows through it. ``z_loss``: the z-loss part of ``loss``, weighted and reduced
    as ``loss`` is (0 when ``lse_square_scale`` is 0), for logging as Liger's ``return_z_loss``.
    """

    loss: torch.Tensor
    lse: torch.Tensor
    z_loss: torch.Tensor


def _number(name: str, value, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be finite and {'>' if positive else '>='} 0, got {value}")
    return value


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class LossOptions:
    """Every non-tensor option of ``fused_tcsm_loss``, validated at construction.

    Travels as one object from the public function to the reference, the custom op (flattened
    once by ``op_args``) and the Triton launcher. ``mask_id`` is checked against V by
    ``_checks.loss_inputs``, where V is known. ``softcap`` None (off) or > 0;
    ``lse_square_scale`` >= 0; ``label_smoothing`` in [0, 1]; ``out_dtype`` None (float32, or
    float64 for float64 logits) or one of ``OUT_DTYPES``. Which target kinds and divergences
    take which option is ``LOSS_CASES``'s, checked by ``case``.
    """

    divergence: str = "kl"
    objective: str = "distrib"
    mask_id: Optional[int] = None
    temperature: float = 1.0
    reduction: str = "mean"
    ignore_index: int = -100
    tail: str = "zero"
    max_log_ratio: float = 30.0
    inplace_backward: bool = False
    backend: str = "auto"
    check: Optional[bool] = None
    softcap: Optional[float] = None
    lse_square_scale: float = 0.0
    label_smoothing: float = 0.0
    return_lse: bool = False
    out_dtype: Optional[torch.dtype] = None

    def __post_init__(self):
        _choice("divergence", self.divergence, DIVERGENCES)
        _choice("objective", self.objective, OBJECTIVES)
        _choice("reduction", self.reduction, REDUCTIONS)
        _choice("tail", self.tail, TAILS)
        _choice("backend", self.backend, BACKENDS)
        object.__setattr__(self, "temperature", _number("temperature", self.temperature))
        object.__setattr__(self, "max_log_ratio", _number("max_log_ratio", self.max_log_ratio))
        if self.max_log_ratio > MAX_LOG_RATIO_LIMIT:
            raise ValueError(f"max_log_ratio must be <= {MAX_LOG_RATIO_LIMIT} (exp of it must "
                             f"stay finite in float32), got {self.max_log_ratio}")
        for name in ("ignore_index",) + (() if self.mask_id is None else ("mask_id",)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if self.check is not None and not isinstance(self.check, bool):
            raise TypeError(f"check must be True, False or None, got {type(self.check).__name__}")
        for name in ("inplace_backward", "return_lse"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got "
                                f"{type(getattr(self, name)).__name__}")
        if self.softcap is not None:
            object.__setattr__(self, "softcap", _number("softcap", self.softcap))
        object.__setattr__(self, "lse_square_scale",
                           _number("lse_square_scale", self.lse_square_scale, positive=False))
        smoothing = _number("label_smoothing", self.label_smoothing, positive=False)
        if smoothing > 1:
            raise ValueError(f"label_smoothing must lie in [0, 1], got {smoothing}")
        object.__setattr__(self, "label_smoothing", smoothing)
        if self.out_dtype is not None and self.out_dtype not in OUT_DTYPES:
            raise TypeError(f"out_dtype must be None or one of {OUT_DTYPES}, got "
                            f"{self.out_dtype!r}")

    @classmethod
    def from_arguments(cls, arguments: dict) -> "LossOptions":
        """The options among a public function's arguments (``locals()`` at its top); the
        fields it does not take keep their defaults."""
        return cls(**{name: arguments[name] for name in _OPTION_NAMES if name in arguments})

    @property
    def uses_lse(self) -> bool:
        """Whether the kernel must form (and may return) the student's row LSE."""
        return self.lse_square_scale > 0 or self.return_lse

    def case(self, target: str, class_weighted: bool = False) -> LossCase:
        """The table row these options select for a target kind; ValueError if none, or if
        an option is set that the row does not define for this divergence."""
        case = find_case(target, self.objective, self.tail)
        if case is None or self.divergence not in case.divergences:
            raise ValueError(_case_error(target, self.divergence, self.objective, self.tail))
        where = f"divergence={self.divergence!r} with a {target} target"
        if self.uses_lse and self.divergence not in case.lse_divergences:
            name = "lse_square_scale" if self.lse_square_scale > 0 else "return_lse"
            raise ValueError(f"{name} needs the student's log-sum-exp, which the loss of {where} "
                             "never forms (it is invariant to a shift of the logits); "
                             f"LSE-forming divergences here: {case.lse_divergences or 'none'}")
        if self.label_smoothing > 0 and self.divergence not in case.smoothing_divergences:
            raise ValueError(
                f"label_smoothing is defined for cross-entropy against the data target "
                f"(divergence='kl', no teacher), not for {where}: the is/gkl data losses are "
                "Monte-Carlo estimates that need a ~ q, and a teacher's target is smoothed by "
                "the caller (e.g. a temperature, or by mixing its probabilities)")
        if class_weighted and not case.class_weight:
            raise ValueError(f"class_weight applies to the data target (one class per row, the "
                             f"clean token), not to a {target} target; per-row weights are "
                             "weight=")
        return case

    def op_args(self, backend: str) -> tuple:
        """The scalar arguments of the ``tcsm::tcsm_loss_*`` ops, in their schema's order
        (softcap 0: off)."""
        return (self.divergence, self.objective, self.tail,
                -1 if self.mask_id is None else self.mask_id, self.temperature,
                self.ignore_index, self.max_log_ratio, self.softcap or 0.0,
                self.lse_square_scale, self.label_smoothing, self.return_lse, backend)

    @classmethod
    def from_op_args(cls, divergence: str, objective: str, tail: str, mask_id: int,
                     temperature: float, ignore_index: int, max_log_ratio: float,
                     softcap: float, lse_square_scale: float, label_smoothing: float,
                     return_lse: bool, backend: str) -> "LossOptions":
        """Inverse of ``op_args``, inside the custom op (``backend`` is the resolved one)."""
        return cls(divergence=divergence, objective=objective, tail=tail,
                   mask_id=None if mask_id < 0 else mask_id, temperature=temperature,
                   ignore_index=ignore_index, max_log_ratio=max_log_ratio,
                   softcap=softcap or None, lse_square_scale=lse_square_scale,
                   label_smoothing=label_smoothing, return_lse=return_lse, backend=backend)


# The field names, read once (torch.compile cannot trace dataclasses.fields).
_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(LossOptions))
