"""Argument conversions the adapters share: the originals take numpy integers and reals and 0/1
integer masks where this library takes Python ints and floats and bool tensors; the checks
themselves are ``_checks``'. Each raises ``TypeError`` or ``ValueError`` naming the argument.
Also the Philox seed of an adapter call, drawn from a torch generator."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .. import _checks


def integer(name: str, value, minimum: int) -> int:
    """A Python or numpy integer (not a bool) >= minimum, as an int."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
    return _checks.integer(name, value, minimum)


def real(name: str, value) -> float:
    """A finite Python or numpy real number (not a bool or a tensor), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def mask(name: str, value) -> torch.Tensor:
    """A bool tensor from a bool or 0/1 integer tensor (its values are checked where
    ``_checks.resolve_check`` checks: CPU tensors)."""
    _checks.tensor(name, value, (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32,
                                 torch.int64))
    if value.dtype == torch.bool:
        return value
    if _checks.resolve_check(None, value.device) and bool(((value != 0) & (value != 1)).any()):
        raise ValueError(f"{name} must hold only 0 and 1 (or be a bool tensor)")
    return value != 0


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A Philox seed for one call, drawn from ``generator`` (default: torch's global one), so
    ``torch.manual_seed`` makes the call reproducible."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))
