"""Training on a sparse (top-K) target instead of the data target: the base of distillation
and reward fine-tuning.

Each step draws the pre-training batch (clean windows, times, masks); a subclass turns the
clean windows into top-K candidates with target log concrete ratios at every position and
gives the student's logits, which are fitted with ``fused_tcsm_loss(teacher_topk=...,
divergence="gkl", objective="score")`` at the masked positions under the loop's weighting
(``--time-weight``).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .batches import IGNORE, make_batch
from .trainer import Trainer

TAILS = ("zero", "ignore")  # non-candidates: target ratio 0, or not counted


class TopKTargetTrainer(Trainer):
    """The pre-training loop with a top-K target; subclasses define
    ``logits_and_targets`` and set ``self.tail``."""

    tail = "zero"

    def logits_and_targets(self, x_t: torch.Tensor, t: torch.Tensor, clean: torch.Tensor
                           ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Student logits (B, L, V) at x_t (B, L), t (B,), and the top-K target (candidate
        ids (B, L, k), log ratios (B, L, k)) from the clean windows (B, L)."""
        raise NotImplementedError

    def train_step(self, ddp) -> None:
        from ..ops.loss import fused_tcsm_loss

        self.step += 1
        device = self.world.device
        batch = make_batch(self.config, self.corpus, self.process, self.step, self.world)
        x_t, t, target = batch.x_t.to(device), batch.t.to(device), batch.target.to(device)
        clean = torch.where(target != IGNORE, target, x_t)  # unmasked positions are clean
        logits, teacher_topk = self.logits_and_targets(x_t, t, clean)
        weight = None if batch.weight is None else batch.weight.to(device)
        loss = fused_tcsm_loss(logits, target, teacher_topk=teacher_topk,
                               divergence="gkl", objective="score", weight=weight,
                               mask_id=self.mask_id, normalizer=batch.normalizer,
                               tail=self.tail)
        self.step_on_loss(loss)
