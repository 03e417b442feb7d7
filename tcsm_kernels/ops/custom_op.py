"""``custom_op``: a ``torch.library.custom_op`` that eager calls bypass.

Our ops are custom ops so that torch.compile can trace them (fake kernels, mutation
annotations). In eager mode the op's Python dispatch adds nothing we use, and its backend
wrapper imports ``torch._dynamo`` on the first call (about 900 modules: a second of a
session's first loss call, docs/performance_history.md). So in plain eager
calls the decorated function is called directly, with the version counters of the
arguments it mutates bumped as the op's ADInplaceOrView kernel would (autograd then still
refuses a backward through a tensor that was saved before we overwrote it).
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch


def _needs_dispatch(args) -> bool:
    """Whether the call must go through the op: under torch.compile, inside a dispatch mode
    (FakeTensorMode, a profiler's or a test's mode, which must see one op) or with tensor
    subclasses (DTensor, ...) that handle the op themselves."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return True
    return any(isinstance(a, torch.Tensor) and type(a) not in (torch.Tensor, torch.nn.Parameter)
               for a in args)


class EagerCustomOp:
    """Callable like the function it wraps; ``.op`` is the registered ``tcsm::`` op."""

    def __init__(self, fn: Callable, name: str, mutates_args: Sequence[str]):
        self.fn = fn
        self.op = torch.library.custom_op(name, mutates_args=tuple(mutates_args))(fn)
        parameters = list(inspect.signature(fn).parameters)
        self._mutated = tuple(parameters.index(arg) for arg in mutates_args)
        self.__doc__ = fn.__doc__

    def register_fake(self, fake: Callable) -> Callable:
        return self.op.register_fake(fake)

    def __call__(self, *args):
        if _needs_dispatch(args):
            return self.op(*args)
        out = self.fn(*args)
        for index in self._mutated:
            torch.autograd.graph.increment_version(args[index])
        return out


def custom_op(name: str, *, mutates_args: Sequence[str] = ()) -> Callable[[Callable], EagerCustomOp]:
    """Decorator: ``torch.library.custom_op(name, mutates_args=...)``, called directly in eager
    mode (positional arguments only)."""
    return lambda fn: EagerCustomOp(fn, name, mutates_args)
