"""Training on a teacher's target instead of the data target: the base of distillation and
reward fine-tuning.

Each step draws the pre-training batch (clean windows, times, masks; from the trainer's window
pool when it has one); a subclass gives the student's logits and the target at the clean
windows -- a dense distribution (``teacher_logits``) or a top-K one (``teacher_topk``) -- which
``fused_tcsm_loss`` fits at the masked positions under the loop's weighting (``--time-weight``)
with the trainer's divergence, objective and tail (docs/math.md 4.2-4.5). The distribution
objective is the default: the score objective is unbiased only for reference tokens drawn from
the target itself (math.md 4.3), which data tokens are not.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..loss_options import LossOptions
from .batches import IGNORE, StepBatch, make_batch
from .run import ConfigError, LossInfo
from .trainer import Trainer

OBJECTIVES = ("distrib", "score")
TAILS = ("zero", "renormalize", "ignore")  # distrib: zero/renormalize; score: zero/ignore


def check_target_options(divergence: str, objective: str, tail: str, kind: str) -> None:
    """ConfigError unless the loss table has this case for a ``kind`` ("dense"/"topk") target."""
    try:
        LossOptions(divergence=divergence, objective=objective, tail=tail).case(kind)
    except ValueError as err:
        raise ConfigError(f"--divergence/--objective/--tail: {err}") from None


class TeacherTargetTrainer(Trainer):
    """The pre-training loop with a teacher's target; subclasses define
    ``logits_and_target`` and may set ``objective``, ``tail`` and ``target``."""

    objective = "distrib"
    tail = "zero"
    target = "teacher"  # what the loss fits, in words (the run's loss.json)

    def loss_info(self) -> LossInfo:
        return LossInfo(self.target, self.config.divergence, self.config.weighting,
                        estimate=False)

    def logits_and_target(self, batch: StepBatch, x_t: torch.Tensor, t: torch.Tensor,
                          clean: torch.Tensor) -> Tuple[torch.Tensor, dict]:
        """Student logits (B, L, V) at x_t (B, L), t (B,), and the target as keyword arguments
        of fused_tcsm_loss (teacher_logits=... or teacher_topk=...) from the clean windows."""
        raise NotImplementedError

    def train_step(self, ddp) -> None:
        from ..ops.loss import fused_tcsm_loss

        self.step += 1
        device = self.world.device
        batch = make_batch(self.config, self.corpus, self.process, self.step, self.world,
                           self.pool)
        x_t, t, target = batch.x_t.to(device), batch.t.to(device), batch.target.to(device)
        clean = torch.where(target != IGNORE, target, x_t)  # unmasked positions are clean
        logits, teacher = self.logits_and_target(batch, x_t, t, clean)
        weight = None if batch.weight is None else batch.weight.to(device)
        loss = fused_tcsm_loss(logits, target, divergence=self.config.divergence,
                               objective=self.objective, tail=self.tail, weight=weight,
                               mask_id=self.mask_id, normalizer=batch.normalizer, **teacher)
        self.step_on_loss(loss)


def with_mask_column(log_probs: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(..., V) log-probabilities over the data symbols -> (..., V + 1) teacher logits with
    -inf at the student's mask column (the data symbols are the first V columns)."""
    if mask_id != log_probs.shape[-1]:
        raise ValueError("the mask column must follow the data symbols")
    return torch.cat([log_probs, torch.full_like(log_probs[..., :1], float("-inf"))], -1)
