"""Vocabulary-parallel TCSM loss: each rank holds logits (..., V / P) for its slice of the
vocabulary (a column-split LM head, as Megatron's vocab-parallel cross-entropy).

The value and each shard's gradient equal the single-process loss on the concatenated logits,
for every row of ``LOSS_CASES`` and every option. By default (float32/bfloat16/float16 on CPU
or CUDA) the shard pass is fused (``fused.py``: row statistics out, one all-gather of (N, few),
the gradient written locally). ``backend="reference"`` (and float64) runs the reference's
formulas on the shard with ``ShardColumns``: every row reduction is completed by an all-reduce
of (N,) or (N, K) values and autograd gives each rank its shard's gradient (gradients summed
over the ranks in backward: every rank must run it), at the cost of a few (N, V / P)
temporaries kept for backward.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import _checks, reference
from ..loss_options import LossOptions, LossOutput
from ..ops.loss import refuse_inplace_on_leaf
from .fused import fused_shard_loss, shard_backend
from .shards import (ShardColumns, agree, check_shard, grad_sum_over_ranks, shard_width,
                     share_of_gradient)

def vocab_parallel_tcsm_loss(logits_shard: torch.Tensor, target: torch.Tensor, *,
                             vocab_start: int, vocab_size: int,
                             group: Optional[dist.ProcessGroup] = None,
                             teacher_logits_shard: Optional[torch.Tensor] = None,
                             teacher_topk: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                             weight: Optional[torch.Tensor] = None,
                             class_weight: Optional[torch.Tensor] = None, normalizer=None,
                             _logits_are_scratch: bool = False, **options):
    """``fused_tcsm_loss`` of the logits whose columns [vocab_start, vocab_start + shard) this
    rank holds as ``logits_shard`` (..., shard); the ranks of ``group`` (default: the world),
    in rank order, hold consecutive shards that tile [0, vocab_size).

    ``target`` (...), ``weight``, ``normalizer``, ``teacher_topk`` (global column ids) and
    ``class_weight`` (vocab_size,) are the same on every rank; ``teacher_logits_shard`` is
    split as the logits. ``options``: those of ``fused_tcsm_loss`` (divergence, objective,
    mask_id (global), temperature, reduction, ignore_index, tail, max_log_ratio, softcap,
    lse_square_scale, label_smoothing, return_lse, out_dtype, check). Every rank returns the
    same loss; backward gives each rank the gradient of its shard. Bad input on any rank
    raises ``ShardError`` on every rank before any collective on data.
    """
    def check():
        opts = LossOptions(**options)
        check_shard("logits_shard", logits_shard, vocab_start, vocab_size)
        if teacher_logits_shard is not None and (
                teacher_logits_shard.shape != logits_shard.shape):
            raise ValueError(f"teacher_logits_shard must have the shard's shape "
                             f"{tuple(logits_shard.shape)}, got "
                             f"{tuple(teacher_logits_shard.shape)}")
        # Validate everything else against the full vocabulary, on stand-ins of its shape.
        full = logits_shard.new_zeros(()).expand(logits_shard.shape[:-1] + (vocab_size,))
        teacher = None if teacher_logits_shard is None else full
        inp = _checks.loss_inputs(full, target, teacher_logits=teacher,
                                  teacher_topk=teacher_topk, weight=weight,
                                  normalizer=normalizer, options=opts, class_weight=class_weight)
        backend = shard_backend(opts, logits_shard)
        if backend != "reference" and not _logits_are_scratch:
            refuse_inplace_on_leaf(logits_shard, opts)
        return opts, inp, backend

    width = shard_width(logits_shard)
    layout, (opts, inp, backend) = agree(check, vocab_start, width, vocab_size, group)
    rows = inp.target.shape[0]
    inp = dataclasses.replace(
        inp, logits=logits_shard.reshape(rows, width),
        teacher_logits=None if teacher_logits_shard is None
        else teacher_logits_shard.detach().reshape(rows, width))
    if backend != "reference":
        inplace = opts.inplace_backward or _logits_are_scratch
        return fused_shard_loss(inp.logits, inp, opts, layout, backend, normalizer, inplace)
    out = reference.loss_from_inputs(inp, opts, normalizer, ShardColumns(layout, opts.mask_id))
    if isinstance(out, LossOutput):
        return out._replace(loss=share_of_gradient(out.loss, layout))
    return share_of_gradient(out, layout)


def vocab_parallel_linear_tcsm_loss(hidden: torch.Tensor, weight_shard: torch.Tensor,
                                    target: torch.Tensor, *, vocab_start: int, vocab_size: int,
                                    group: Optional[dist.ProcessGroup] = None,
                                    bias_shard: Optional[torch.Tensor] = None, **kwargs):
    """The loss of a column-split LM head: ``weight_shard`` (shard, D) holds rows
    [vocab_start, vocab_start + shard) of the head, ``hidden`` (..., D) is the same on every
    rank. The hidden states' gradient is summed over the ranks (each rank's shard contributes
    its part); the head shard's gradient is this rank's. The (N, shard) logits of this rank
    are formed (not the (N, V) ones). ``kwargs``: those of ``vocab_parallel_tcsm_loss``."""
    def check():
        _checks.tensor("hidden", hidden, _checks.FLOAT_DTYPES)
        _checks.tensor("weight_shard", weight_shard, _checks.FLOAT_DTYPES)
        if hidden.dim() < 1 or weight_shard.dim() != 2 or (
                weight_shard.shape[1] != hidden.shape[-1]):
            raise ValueError(f"weight_shard must have shape (shard, D) with D = hidden's last "
                             f"dimension, got {tuple(weight_shard.shape)} and hidden "
                             f"{tuple(hidden.shape)}")

    try:
        check()
    except (TypeError, ValueError):
        # The other ranks meet this collective inside the loss's own agreement step.
        agree(check, vocab_start, 0, vocab_size, group)
    logits_shard = F.linear(grad_sum_over_ranks(hidden, group), weight_shard, bias_shard)
    return vocab_parallel_tcsm_loss(logits_shard, target, vocab_start=vocab_start,
                                    vocab_size=vocab_size, group=group,
                                    _logits_are_scratch=True, **kwargs)
