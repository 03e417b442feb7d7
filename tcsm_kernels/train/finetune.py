"""Reward fine-tuning of a masked-diffusion model toward p*(x) ∝ p_ref(x) exp(r(x) / beta)
(docs/math.md 6, reward tilt).

The student is the frozen reference plus a learned residual (a trainable copy of the reference
followed by a zero-initialised linear head), so it starts equal to the reference. At the masked
positions of x_t, with x a clean training window, the target at position i is the tilted
distribution over the reference's top-K candidates y,

    q_i(y) ∝ p_ref(y | x_t) exp((r(x with x_i = y) - r(x)) / beta)      (y in S),

with the reference's mass off S left untilted as the rest cell (``tail="zero"``; or
``renormalize``): a known distribution, fitted with the distribution objective (math.md 4.5).
The reward difference is exact (rule-based rewards: every neighbour scored) or first order in
the one-hot input (differentiable rewards: one backward). The score objective (log-ratios
against the data token x_i, ``--objective score``) is biased: x_i is not drawn from q_i.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import checkpoint, distributed
from .data import TokenCorpus
from .files import write_json_atomic
from .rewards import REWARDS, SequenceClassifier, make_reward, reward_deltas
from .run import ConfigError, TrainConfig, load_trained
from .topk_target import OBJECTIVES, TAILS, TeacherTargetTrainer, check_target_options
from .trainer import Session, create_run, open_session

FINETUNE_FILE = "finetune.json"
CLASSIFIER_DIR = "reward_classifier"


def tilted_topk_targets(reference_logits: torch.Tensor, x: torch.Tensor, reward, beta: float,
                        k: int) -> tuple:
    """Candidate ids (B, L, k) (the reference's top k, mask column excluded: the data symbols
    are the first V columns) and target log ratios (B, L, k): the reference's plus the reward
    differences / beta."""
    from ..ops.topk_scores import topk_concrete_scores

    data_logits = reference_logits[..., :reward.vocab_size].detach()
    indices, log_ratios, _ = topk_concrete_scores(data_logits, x, k)
    deltas = reward_deltas(reward, x, indices)
    return indices, log_ratios + deltas.detach() / beta


def tilted_topk_distribution(reference_logits: torch.Tensor, x: torch.Tensor, reward,
                             beta: float, k: int) -> tuple:
    """The tilted target q_i on the reference's top k candidates: ids (B, L, k) and
    log-probabilities (B, L, k), normalised together with the reference's untilted mass off
    the candidates (which stays the rest, 1 - sum q). Data symbols are the first V columns."""
    log_p = torch.log_softmax(reference_logits[..., :reward.vocab_size].detach().float(), -1)
    top = log_p.topk(k, dim=-1)
    tilted = top.values + reward_deltas(reward, x, top.indices).detach().float() / beta
    # log (1 - P_ref(S)), 0 mass when the candidates hold all of it
    log_rest = torch.log1p(-torch.logsumexp(top.values, -1).exp().clamp(max=1.0))
    log_norm = torch.logsumexp(torch.cat([tilted, log_rest[..., None]], -1), -1)
    return top.indices, tilted - log_norm[..., None]


class ResidualStudent(nn.Module):
    """Student logits = frozen reference logits + head(trainable copy of the reference), the
    head zero-initialised: the student equals the reference at the start. (B, L) -> (B, L, V)."""

    def __init__(self, reference: nn.Module):
        super().__init__()
        vocab = reference.config.vocab_size
        self.reference = reference.requires_grad_(False).eval()
        self.trunk = copy.deepcopy(reference).requires_grad_(True).train()
        self.head = nn.Linear(vocab, vocab)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            base = self.reference(x_t, t)
        return base + self.head(self.trunk(x_t, t))

    def train(self, mode: bool = True):
        super().train(mode)
        self.reference.eval()
        return self


@dataclass
class FinetuneOptions:
    reference: str  # run directory of a masked-diffusion model (tcsm train / tcsm distill)
    reward: str = "vowels"
    beta: float = 1.0
    k: int = 8
    tail: str = "zero"
    reward_steps: int = 200  # classifier training steps
    objective: str = "distrib"

    def validate(self) -> None:
        if not self.beta > 0 or not math.isfinite(self.beta):
            raise ConfigError(f"--beta must be a finite number > 0; got {self.beta}")
        if self.reward not in REWARDS:
            raise ConfigError(f"--reward must be one of {', '.join(REWARDS)}; got "
                              f"{self.reward!r}")
        if self.tail not in TAILS or self.objective not in OBJECTIVES:
            raise ConfigError(f"--tail must be one of {', '.join(TAILS)} and --objective one "
                              f"of {', '.join(OBJECTIVES)}")
        check_target_options("kl" if self.objective == "distrib" else "gkl", self.objective,
                             self.tail, "topk")
        if self.k <= 0 or self.reward_steps <= 0:
            raise ConfigError("--k and --reward-steps must be > 0")
        if not (Path(self.reference) / "config.json").is_file():
            raise ConfigError(f"--ref {self.reference}: not a run directory (no config.json)")


class Finetuner(TeacherTargetTrainer):
    """The pre-training loop with the reward-tilted top-K target and a ResidualStudent."""

    def __init__(self, config: TrainConfig, session: Session, run_dir: Path,
                 world: distributed.World, options: FinetuneOptions, reference: nn.Module,
                 reward):
        self.options, self.reward = options, reward
        self.objective, self.tail = options.objective, options.tail
        self.target = f"reward-tilted reference (top-{options.k}, {options.objective})"
        super().__init__(config, session, run_dir, world)
        self.replace_model(ResidualStudent(reference))

    def logits_and_target(self, batch, x_t: torch.Tensor, t: torch.Tensor,
                          clean: torch.Tensor):
        student, options = self.model, self.options
        with torch.no_grad():
            reference_logits = student.reference(x_t, t)
        targets = (tilted_topk_distribution if options.objective == "distrib"
                   else tilted_topk_targets)
        teacher_topk = targets(reference_logits, clean, self.reward, options.beta, options.k)
        logits = reference_logits + student.head(student.trunk(x_t, t))
        return logits, {"teacher_topk": teacher_topk}


def finetune(options: FinetuneOptions, session: Session, steps: int, lr: float,
             batch_size: Optional[int] = None, seed: int = 0) -> dict:
    """`tcsm finetune`: a new run in ``session.out`` (the reference's configuration with these
    steps, learning rate, batch size and seed). Returns the training summary plus the
    ``student``, ``reference``, ``reward`` objects and the reward description."""
    options.validate()
    if steps <= 0 or lr <= 0:
        raise ConfigError("--steps and --lr must be > 0")
    run_dir, device, _ = open_session(None, session)
    reference_run = load_trained(options.reference, device=session.device)
    if not reference_run.config.masked:
        raise ConfigError(f"--ref {options.reference} is a {reference_run.config.process} run; "
                          f"reward fine-tuning needs a masked one")
    if options.k > reference_run.corpus.vocab.size:
        raise ConfigError(f"--k {options.k} exceeds the vocabulary size "
                          f"{reference_run.corpus.vocab.size}")
    changes = {"divergence": "gkl" if options.objective == "score"
               else reference_run.config.divergence,
               "steps": steps, "lr": lr, "seed": seed, "warmup": min(reference_run.config.warmup,
                                                                        steps // 10),
               "eval_every": 0, "ckpt_every": 0, "decay_steps": None}
    if batch_size is not None:
        changes["batch_size"] = batch_size
    config = TrainConfig(**{**asdict(reference_run.config), **changes})
    config.validate()
    create_run(config, run_dir)
    corpus = TokenCorpus(run_dir, config.val_fraction)
    reward, description = make_reward(options.reward, corpus, config.seq_len, seed,
                                       options.reward_steps)
    write_json_atomic(run_dir / FINETUNE_FILE, {**asdict(options), **description})
    if isinstance(reward, SequenceClassifier):
        checkpoint.save(run_dir / CLASSIFIER_DIR, {"model": reward.state_dict()})
        reward = reward.to(device)
    trainer = Finetuner(config, session, run_dir, distributed.World(0, 1, device), options,
                        reference_run.model, reward)
    summary = trainer.run()
    return {**summary, **description, "student": trainer.model.eval(),
            "reference": reference_run.model, "reward_fn": reward}
