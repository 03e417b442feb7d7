"""One-line drop-ins with the call signatures of other code bases, running on the fused ops.

- ``flow_matching``: facebookresearch/flow_matching's ``MixturePathGeneralizedKL`` loss and
  ``MixtureDiscreteEulerSolver`` (without the divergence-free term).
- ``llada``: ML-GSAI/LLaDA's ``get_num_transfer_tokens``, ``get_transfer_index`` and training
  loss (``masked_ce``).
- ``mdlm``: kuleshov-group/mdlm's SUBS masked NELBO term (``subs_loss``).
"""
from . import flow_matching, llada, mdlm

__all__ = ["flow_matching", "llada", "mdlm"]
