"""The real facebookresearch/flow_matching (1.0.10) when importable, and a transcription of its
generalized KL loss (flow_matching/loss/generalized_loss.py at commit
11568d37f8d5a080e12aa7b5305d9c35ae07d136, the same in 1.0.10) with a stand-in for its
polynomial mixture path, so the loss is also checked where the package is missing.
"""
import types

import torch

try:
    from flow_matching.loss import MixturePathGeneralizedKL
    from flow_matching.path import MixtureDiscreteProbPath
    from flow_matching.path.scheduler import PolynomialConvexScheduler
    from flow_matching.solver import MixtureDiscreteEulerSolver
    MISSING = None
except ImportError as error:  # CI installs flow-matching==1.0.10 (scripts/env.sh)
    MISSING = f"flow_matching is not importable ({error}); install flow-matching==1.0.10"


def polynomial_path(n):
    """flow_matching's MixtureDiscreteProbPath(PolynomialConvexScheduler(n))."""
    return MixtureDiscreteProbPath(PolynomialConvexScheduler(n=n))


class StandInPath:
    """alpha_t = t ** n and its derivative, as PolynomialConvexScheduler(n)."""

    def __init__(self, n):
        self.n = n

    def scheduler(self, t):
        return types.SimpleNamespace(alpha_t=t ** self.n, d_alpha_t=self.n * t ** (self.n - 1))


class TranscribedGeneralizedKL:
    """MixturePathGeneralizedKL's forward formula."""

    def __init__(self, path, reduction="mean"):
        self.path, self.reduction = path, reduction

    def __call__(self, logits, x_1, x_t, t):
        log_p = torch.log_softmax(logits, dim=-1)
        log_p_x1 = log_p.gather(-1, x_1[..., None])[..., 0]
        p_xt = log_p.exp().gather(-1, x_t[..., None])[..., 0]
        sched = self.path.scheduler(t)
        coef = (sched.d_alpha_t / (1 - sched.alpha_t))[(...,) + (None,) * (x_1.dim() - 1)]
        delta = (x_t == x_1).to(log_p.dtype)
        loss = -coef * (p_xt - delta + (1 - delta) * log_p_x1)
        return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[self.reduction]()
