"""Transcriptions of MDLM's SUBS loss term and log-linear time weight, run beside the adapter.

They follow kuleshov-group/mdlm at commit c112c526d193436838c98d81455ee51f90309470:
diffusion.py (_subs_parameterization, the continuous-time SUBS branch of
_forward_pass_diffusion) and noise_schedule.py (LogLinearNoise).
"""
import torch

NEG_INFINITY = -1000000.0


def mdlm_subs_loss(logits, x0, xt, mask_id, weight):
    """-log p(x0) under SUBS, times a per-sequence weight (B,)."""
    logits = logits.clone()
    logits[:, :, mask_id] += NEG_INFINITY
    log_p = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    unmasked = xt != mask_id
    log_p[unmasked] = NEG_INFINITY
    log_p[unmasked, xt[unmasked]] = 0
    log_p_theta = log_p.gather(-1, x0[..., None])[..., 0]
    return -log_p_theta * weight[:, None]


def mdlm_loglinear_weight(t, eps=1e-3):
    """dsigma / expm1(sigma) with LogLinearNoise's total and rate noise."""
    sigma = -torch.log1p(-(1 - eps) * t)
    dsigma = (1 - eps) / (1 - (1 - eps) * t)
    return dsigma / torch.expm1(sigma)
