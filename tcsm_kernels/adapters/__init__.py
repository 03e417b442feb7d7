"""One-line drop-ins with the call signatures of other code bases, running on the fused ops.

- ``flow_matching``: facebookresearch/flow_matching's ``MixturePathGeneralizedKL`` loss and
  ``MixtureDiscreteEulerSolver`` (with the divergence-free term).
- ``llada``: ML-GSAI/LLaDA's ``generate``, ``add_gumbel_noise``, ``get_num_transfer_tokens``
  and training loss (``masked_ce``); NVlabs/Fast-dLLM's ``get_transfer_index`` and the
  ``threshold`` of its ``generate``.
- ``mdlm``: kuleshov-group/mdlm's SUBS masked NELBO term (``subs_loss``) and log-linear time
  weight (``loglinear_weight``).
"""
from . import flow_matching, llada, mdlm

__all__ = ["flow_matching", "llada", "mdlm"]
