"""tcsm_kernels: fused kernels for Target Concrete Score Matching (discrete diffusion LMs).

Public API: ``fused_tcsm_loss`` / ``TCSMLoss`` (docs/math.md 4-5), ``ctmc_step`` (math.md 7),
``topk_concrete_scores`` / ``topk_log_probs`` (math.md 6); ``LOSS_CASES`` lists what the loss
computes; ``reference`` holds the plain-PyTorch oracle of each.
"""
from . import processes, reference, schedules
from .ops.ctmc_step import ctmc_step
from .ops.linear_loss import TCSMLinearLoss, fused_linear_tcsm_loss
from .ops.loss import TCSMLoss, fused_tcsm_loss, release_buffer_cache
from .ops.row_lse import row_logsumexp
from .ops.topk_scores import TopKTarget, topk_concrete_scores, topk_log_probs
from .loss_options import LOSS_CASES, LossOptions, LossOutput
from .processes import MaskedProcess, UniformProcess
from .schedules import get_schedule
from . import distributed  # noqa: E402 (tcsm_kernels.distributed.vocab_parallel_*)

__all__ = ["fused_tcsm_loss", "TCSMLoss", "fused_linear_tcsm_loss", "TCSMLinearLoss",
           "release_buffer_cache", "ctmc_step", "topk_concrete_scores", "reference", "schedules", "processes", "MaskedProcess",
           "UniformProcess", "get_schedule", "row_logsumexp", "topk_log_probs", "TopKTarget",
           "LOSS_CASES", "LossOptions", "LossOutput", "distributed"]
__version__ = "0.1.0"
