"""Vocabulary-parallel ops over torch.distributed: each rank of a group holds a consecutive
slice of the vocabulary's columns (a column-split LM head); results equal the single-process
ops on the concatenated columns, with O(N) values per collective and never the (N, V) logits.

- ``vocab_parallel_tcsm_loss``: the TCSM loss of logits shards (every target and option).
- ``vocab_parallel_linear_tcsm_loss``: the same from hidden states and a head shard.
- ``vocab_parallel_ctmc_step``: the CTMC sampling step of logits shards.
"""
from .loss import vocab_parallel_linear_tcsm_loss, vocab_parallel_tcsm_loss
from .shards import ShardError
from .step import vocab_parallel_ctmc_step

__all__ = ["vocab_parallel_tcsm_loss", "vocab_parallel_linear_tcsm_loss",
           "vocab_parallel_ctmc_step", "ShardError"]
