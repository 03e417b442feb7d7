"""``Columns``: how the reference loss reads a block of rows' vocabulary columns.

The loss formulas of docs/math.md 4 touch the columns of a row only through row reductions
(sums, log-sum-exps, maxima), gathers at given ids and a membership mask of given ids. The
reference writes them against this interface; this class holds every column of the row. The
vocabulary-parallel loss (``tcsm_kernels.distributed``) holds a slice of the columns per rank
and completes each reduction across ranks, so the two run the same formulas.

Ids are in the participating space: the full vocabulary with the mask column removed
(math.md 1), as ``remap_ids`` gives them.
"""
from __future__ import annotations

from typing import Optional

import torch


def remap_ids(ids: torch.Tensor, mask_id: Optional[int]) -> torch.Tensor:
    """Column ids in the (V - 1)-column space that has the mask column removed."""
    if mask_id is None:
        return ids
    return ids - (ids > mask_id).to(ids.dtype)


class Columns:
    """All ``n_cols`` columns of a block of rows, ``mask_id`` (or None) excluded; ``v`` is the
    number of participating columns (the V of the formulas)."""

    def __init__(self, n_cols: int, mask_id: Optional[int]):
        self.mask_id = mask_id
        self.v = n_cols - (mask_id is not None)

    def participating(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, n_cols) -> (N, V) without the mask column (mask_id acts as -inf)."""
        if self.mask_id is None:
            return rows
        keep = torch.arange(rows.shape[1], device=rows.device) != self.mask_id
        return rows[:, keep]

    def local(self, per_column: torch.Tensor) -> torch.Tensor:
        """A (V,) per-column vector (participating space) restricted to the held columns."""
        return per_column

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """(N, V_held) -> (N,) sum over the row."""
        return x.sum(1)

    def logsumexp(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(x, dim=1)

    def amax(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(1)

    def any(self, x: torch.Tensor) -> torch.Tensor:
        return x.any(1)

    def gather(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x (N, V_held) at ids (N, K) in [0, V) -> (N, K)."""
        return x.gather(1, ids)

    def members(self, ids: torch.Tensor, counted: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(N, V_held) bool: the held columns that are one of the row's counted ids (N, K)."""
        hits = torch.zeros(like.shape, dtype=torch.int32, device=like.device)
        return hits.scatter_add(1, ids, counted.to(torch.int32)) > 0
