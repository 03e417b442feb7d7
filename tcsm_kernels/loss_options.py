"""The loss's options as one validated object, and the one table of what the loss computes.

``LOSS_CASES`` lists every (target, objective, tail) the loss accepts with the divergences each
allows and the section of docs/math.md that defines it. Validation (``LossOptions.case``),
the documentation table (``cases_markdown``) and the tests all read this table, so a new case
is one new row here plus its kernels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

DIVERGENCES = ("kl", "is", "gkl")
OBJECTIVES = ("distrib", "score")
TAILS = ("zero", "ignore", "renormalize")
REDUCTIONS = ("none", "sum", "mean")
BACKENDS = ("auto", "reference", "cpp", "triton")
TARGETS = ("data", "dense", "topk")
# The kernels compute in float32: exp(80) = 5.5e34 leaves room for sums of such terms.
MAX_LOG_RATIO_LIMIT = 80.0


@dataclass(frozen=True)
class LossCase:
    """One row of the table: a target kind, objective and tail, and the divergences allowed.
    ``objective``/``tail`` None: the option does not apply (any value is accepted, unused)."""

    target: str
    objective: Optional[str]
    tail: Optional[str]
    divergences: Tuple[str, ...]
    section: str  # docs/math.md section
    computes: str


LOSS_CASES: Tuple[LossCase, ...] = (
    LossCase("data", None, None, ("kl", "is", "gkl"), "4.1",
             "Monte-Carlo estimate from the clean token a ~ q_data: kl is cross-entropy"),
    LossCase("dense", "distrib", None, ("kl", "is", "gkl"), "4.2",
             "divergence of q = softmax(u / tau) and p, analytic over the vocabulary"),
    LossCase("dense", "score", None, ("is", "gkl"), "4.3",
             "ratio divergence against reference token a; unbiased only for a ~ q"),
    LossCase("topk", "distrib", "zero", ("kl", "is", "gkl"), "4.5",
             "q on its K entries, the rest 1 - sum q as one cell: a divergence on S + {rest}"),
    LossCase("topk", "distrib", "renormalize", ("kl",), "4.5",
             "q / sum_S q on its K entries, 0 elsewhere (is/gkl would be infinite there)"),
    LossCase("topk", "score", "zero", ("is", "gkl"), "4.4",
             "ratios exp(rho) on S, 0 target ratio on the rest; unbiased only for a ~ q"),
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
    lines = ["| target | objective | tail | divergences | math.md | what it computes |",
             "| --- | --- | --- | --- | --- | --- |"]
    for c in LOSS_CASES:
        lines.append(f"| {c.target} | {c.objective or 'any'} | {c.tail or '-'} | "
                     f"{', '.join(c.divergences)} | §{c.section} | {c.computes} |")
    return "\n".join(lines)


def _number(name: str, value, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class LossOptions:
    """Every non-tensor option of ``fused_tcsm_loss``, validated at construction.

    Travels as one object from the public function to the reference, the custom op (flattened
    once by ``op_args``) and the Triton launcher. ``mask_id`` is checked against V by
    ``_checks.loss_inputs``, where V is known.
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
        if not isinstance(self.inplace_backward, bool):
            raise TypeError("inplace_backward must be True or False, got "
                            f"{type(self.inplace_backward).__name__}")

    def case(self, target: str) -> LossCase:
        """The table row these options select for a target kind; ValueError if none."""
        case = find_case(target, self.objective, self.tail)
        if case is None or self.divergence not in case.divergences:
            raise ValueError(_case_error(target, self.divergence, self.objective, self.tail))
        return case

    def op_args(self, backend: str) -> tuple:
        """The scalar arguments of the ``tcsm::tcsm_loss_*`` ops, in their schema's order."""
        return (self.divergence, self.objective, self.tail,
                -1 if self.mask_id is None else self.mask_id, self.temperature,
                self.ignore_index, self.max_log_ratio, backend)

    @classmethod
    def from_op_args(cls, divergence: str, objective: str, tail: str, mask_id: int,
                     temperature: float, ignore_index: int, max_log_ratio: float,
                     backend: str) -> "LossOptions":
        """Inverse of ``op_args``, inside the custom op (``backend`` is the resolved one)."""
        return cls(divergence=divergence, objective=objective, tail=tail,
                   mask_id=None if mask_id < 0 else mask_id, temperature=temperature,
                   ignore_index=ignore_index, max_log_ratio=max_log_ratio, backend=backend)
