"""Reward fine-tuning of a masked-diffusion model toward p*(x) ∝ p_ref(x) exp(r(x) / beta)
(SPEC 6, reward tilt).

The student is the frozen reference plus a learned residual (a trainable copy of the reference
followed by a zero-initialised linear head), so it starts equal to the reference. At the masked
positions of x_t, with x a clean training window (the proposal: TCSM's score-matching loss is
minimised by the target for any proposal of full support, and windows cost nothing to draw),
the target log concrete ratios for the reference's top-K candidates y at position i are

    log p_ref(y | x_t) - log p_ref(x_i | x_t) + (r(x with x_i = y) - r(x)) / beta,

the reward difference exact (rule-based rewards: every neighbour scored) or first order in the
one-hot input (differentiable rewards: one backward). The current token x_i is the reference
token a of the loss (ratio 1). The loss is the same fused top-K loss as distillation.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, distributed
from .ar_teacher import replace_model, step_on_loss
from .data import TokenCorpus, batch_starts, read_windows, step_generator
from .distill import TAILS
from .pretrain import IGNORE, Session, Trainer, _create_run, make_batch
from .run import (ConfigError, TrainConfig, load_trained, make_process, mask_token,
                  resolve_device)

REWARDS = ("vowels", "classifier")
FINETUNE_FILE = "finetune.json"
CLASSIFIER_DIR = "reward_classifier"
VOWELS = set("aeiouAEIOU")


class VowelReward:
    """Rule-based reward: the number of vowel symbols in the sequence. r(x) (B,)."""

    differentiable = False

    def __init__(self, vocab):
        self.vocab_size = vocab.size
        self.is_vowel = torch.tensor([vocab.decode([i]) in VOWELS for i in range(vocab.size)],
                                     dtype=torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.is_vowel.to(x.device)[x].sum(-1)


class SequenceClassifier(nn.Module):
    """Tiny convolutional classifier on one-hot sequences (B, L, V) -> log-odds (B,) of the
    second half of the training corpus; differentiable in its one-hot input."""

    differentiable = True

    def __init__(self, vocab_size: int, width: int = 32):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Linear(vocab_size, width, bias=False)
        self.conv = nn.Conv1d(width, width, kernel_size=5, padding=2)
        self.out = nn.Linear(width, 1)

    def log_odds(self, one_hot: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.embed(one_hot).transpose(1, 2))
        return self.out(F.gelu(h).mean(-1))[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """r(x) (B,) for ids x (B, L)."""
        return self.log_odds(F.one_hot(x, self.vocab_size).float())


def train_classifier(corpus: TokenCorpus, seq_len: int, steps: int, seed: int,
                     batch_size: int = 64) -> tuple:
    """A SequenceClassifier telling windows of the first half of the training split (label 0)
    from the second half (label 1); returns it (frozen) and its accuracy on fresh windows."""
    torch.manual_seed(seed)
    model = SequenceClassifier(corpus.vocab.size)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    half = len(corpus.train) // 2
    if half < seq_len:
        raise ConfigError("the training split is too short for the classifier reward")

    def windows(step):
        generator = step_generator(seed + 7919, step)
        starts = batch_starts(half, batch_size, seq_len, generator)
        labels = torch.randint(0, 2, (batch_size,), generator=generator)
        return read_windows(corpus.train, starts + labels.numpy() * half, seq_len), labels

    for step in range(steps):
        x, labels = windows(step)
        loss = F.binary_cross_entropy_with_logits(model(x), labels.float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        x, labels = windows(steps + 1_000_000)
        accuracy = ((model(x) > 0).long() == labels).float().mean().item()
    return model.requires_grad_(False).eval(), accuracy


def exact_reward_deltas(reward, x: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """r(x with x_i = y) - r(x) (B, L, k) for candidates y (B, L, k), every neighbour scored."""
    b, length, k = candidates.shape
    neighbours = x[:, None, None, :].expand(b, length, k, length).clone()
    positions = torch.arange(length, device=x.device)
    neighbours[:, positions, :, positions] = candidates.permute(1, 0, 2)
    return (reward(neighbours.reshape(-1, length)).view(b, length, k)
            - reward(x)[:, None, None])


def taylor_reward_deltas(reward: SequenceClassifier, x: torch.Tensor,
                         candidates: torch.Tensor) -> torch.Tensor:
    """First-order r(x with x_i = y) - r(x) ≈ g_{i,y} - g_{i,x_i} (B, L, k), g = dr / d one-hot
    (B, L, V) from one backward."""
    with torch.enable_grad():
        one_hot = F.one_hot(x, reward.vocab_size).float().requires_grad_(True)
        (gradient,) = torch.autograd.grad(reward.log_odds(one_hot).sum(), one_hot)
    return gradient.gather(-1, candidates) - gradient.gather(-1, x[..., None])


def tilted_topk_targets(reference_logits: torch.Tensor, x: torch.Tensor, reward, beta: float,
                        k: int) -> tuple:
    """Candidate ids (B, L, k) (the reference's top k, mask column excluded: the data symbols
    are the first V columns) and target log ratios (B, L, k): the reference's plus the reward
    differences / beta."""
    from ..ops.topk_scores import topk_concrete_scores

    data_logits = reference_logits[..., :reward.vocab_size].detach()
    indices, log_ratios, _ = topk_concrete_scores(data_logits, x, k)
    deltas = (taylor_reward_deltas if reward.differentiable else exact_reward_deltas)(
        reward, x, indices)
    return indices, log_ratios + deltas.detach() / beta


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

    def validate(self) -> None:
        if not self.beta > 0 or not math.isfinite(self.beta):
            raise ConfigError(f"--beta must be a finite number > 0; got {self.beta}")
        if self.reward not in REWARDS:
            raise ConfigError(f"--reward must be one of {', '.join(REWARDS)}; got "
                              f"{self.reward!r}")
        if self.tail not in TAILS:
            raise ConfigError(f"--tail must be one of {', '.join(TAILS)}; got {self.tail!r}")
        if self.k <= 0 or self.reward_steps <= 0:
            raise ConfigError("--k and --reward-steps must be > 0")
        if not (Path(self.reference) / "config.json").is_file():
            raise ConfigError(f"--ref {self.reference}: not a run directory (no config.json)")


def make_reward(options: FinetuneOptions, corpus: TokenCorpus, seq_len: int, seed: int):
    """The reward function and a description of it."""
    if options.reward == "vowels":
        return VowelReward(corpus.vocab), {"reward": "vowels: number of vowels"}
    classifier, accuracy = train_classifier(corpus, seq_len, options.reward_steps, seed)
    return classifier, {"reward": "classifier: log-odds of the corpus' second half",
                        "classifier_accuracy": accuracy}


class Finetuner(Trainer):
    """The pre-training loop with the reward-tilted top-K target and a ResidualStudent."""

    def __init__(self, config: TrainConfig, session: Session, run_dir: Path,
                 world: distributed.World, options: FinetuneOptions, reference: nn.Module,
                 reward):
        super().__init__(config, session, run_dir, world)
        self.options, self.reward = options, reward
        replace_model(self, ResidualStudent(reference))

    def train_step(self, ddp) -> None:
        from ..ops.loss import fused_tcsm_loss

        self.step += 1
        device, options = self.world.device, self.options
        batch = make_batch(self.config, self.corpus, self.process, self.step, self.world)
        x_t, t, target = batch.x_t.to(device), batch.t.to(device), batch.target.to(device)
        clean = torch.where(target != IGNORE, target, x_t)
        student = self.model
        with torch.no_grad():
            reference_logits = student.reference(x_t, t)
        indices, log_ratios = tilted_topk_targets(reference_logits, clean, self.reward,
                                                  options.beta, options.k)
        logits = reference_logits + student.head(student.trunk(x_t, t))
        weight = None if batch.weight is None else batch.weight.to(device)
        loss = fused_tcsm_loss(logits, target, teacher_topk=(indices, log_ratios),
                               divergence="gkl", objective="score", weight=weight,
                               mask_id=self.mask_id,
                               normalizer=batch.normalizer, tail=options.tail)
        step_on_loss(self, loss)


def finetune(options: FinetuneOptions, session: Session, steps: int, lr: float,
             batch_size: Optional[int] = None, seed: int = 0) -> dict:
    """`tcsm finetune`: a new run in ``session.out`` (the reference's configuration with these
    steps, learning rate, batch size and seed). Returns the training summary plus the
    ``student``, ``reference``, ``reward`` objects and the reward description."""
    options.validate()
    if steps <= 0 or lr <= 0:
        raise ConfigError("--steps and --lr must be > 0")
    device = resolve_device(session.device)
    if session.threads:
        torch.set_num_threads(session.threads)
    reference_run = load_trained(options.reference, device=session.device)
    if not reference_run.config.masked:
        raise ConfigError(f"--ref {options.reference} is a {reference_run.config.process} run; "
                          f"reward fine-tuning needs a masked one")
    if options.k > reference_run.corpus.vocab.size:
        raise ConfigError(f"--k {options.k} exceeds the vocabulary size "
                          f"{reference_run.corpus.vocab.size}")
    changes = {"steps": steps, "lr": lr, "seed": seed, "warmup": min(reference_run.config.warmup,
                                                                        steps // 10),
               "eval_every": 0, "ckpt_every": 0}
    if batch_size is not None:
        changes["batch_size"] = batch_size
    config = TrainConfig(**{**asdict(reference_run.config), **changes})
    config.validate()
    run_dir = Path(session.out)
    _create_run(config, run_dir)
    corpus = TokenCorpus(run_dir, config.val_fraction)
    reward, description = make_reward(options, corpus, config.seq_len, seed)
    (run_dir / FINETUNE_FILE).write_text(json.dumps({**asdict(options), **description}))
    if isinstance(reward, SequenceClassifier):
        checkpoint.save(run_dir / CLASSIFIER_DIR, {"model": reward.state_dict()})
        reward = reward.to(device)
    trainer = Finetuner(config, session, run_dir, distributed.World(0, 1, device), options,
                        reference_run.model, reward)
    summary = trainer.run()
    return {**summary, **description, "student": trainer.model.eval(),
            "reference": reference_run.model, "reward_fn": reward}


@torch.no_grad()
def path_kl_nats(student: nn.Module, reference: nn.Module, samples: torch.Tensor, process,
                 mask_id: int, time_samples: int = 8, seed: int = 0) -> float:
    """Per-token KL of the student's reverse path from the reference's, on the student's
    samples (B, L): E_t sum_i w(t) [x_t^i masked] KL(p_s(.|x_t) || p_ref(.|x_t)) / L, stratified
    times. An upper bound (data processing) on KL(p_student || p_ref) per token."""
    generator = torch.Generator().manual_seed(seed)
    offset = torch.rand(len(samples), generator=generator)
    total = 0.0
    for k in range(time_samples):
        t = (k + offset) / time_samples
        x_t = process.sample(samples.cpu(), t, generator=generator).to(samples.device)
        weight = process.schedule.time_weight(t).to(samples.device)[:, None]
        device_t = t.to(samples.device)
        log_s = torch.log_softmax(student(x_t, device_t).float()[..., :mask_id], -1)
        log_r = torch.log_softmax(reference(x_t, device_t).float()[..., :mask_id], -1)
        kl = (log_s.exp() * (log_s - log_r)).sum(-1)
        total += (weight * kl * (x_t == mask_id)).sum().item()
    return total / (time_samples * samples.numel())


def sample_entropy_bits(samples: torch.Tensor, vocab_size: int) -> float:
    """Unigram entropy (bits) of the symbols in samples: low values flag degenerate text."""
    counts = np.bincount(samples.flatten().cpu().numpy(), minlength=vocab_size).astype(float)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


@torch.no_grad()
def sample_sequences(model: nn.Module, num: int, seq_len: int, mask_id: int, schedule,
                     seed: int) -> torch.Tensor:
    """(num, seq_len) samples from all-mask with the exact masked sampler, one step per token."""
    from ..sampling import sample_masked

    x = torch.full((num, seq_len), mask_id, dtype=torch.int64)
    return sample_masked(model, x, steps=seq_len, mask_id=mask_id, schedule=schedule, seed=seed)


def sweep_beta(out: str, *, reference: str, reward: str, betas: list, steps: int, lr: float,
               k: int = 8, reward_steps: int = 200, samples: int = 64,
               threads: Optional[int] = None, quiet: bool = True) -> str:
    """Fine-tune the reference for each beta (runs in out/beta_B), then score samples of each
    model: mean reward, per-token path KL from the reference (nats), symbol entropy (bits) and an
    example. Writes ``beta_sweep.md`` and ``beta_sweep.png`` into ``out``; returns the table."""
    from ..schedules import get_schedule
    from .distill import write_table

    if not betas:
        raise ConfigError("--betas needs at least one value")
    out_dir = Path(out)
    reference_run = load_trained(reference, device="cpu")
    config, corpus = reference_run.config, reference_run.corpus
    process, mask_id = make_process(config, corpus), mask_token(config, corpus)
    schedule = get_schedule(config.schedule)

    def describe(model, label, reward_fn):
        x = sample_sequences(model, samples, config.seq_len, mask_id, schedule, seed=1)
        mean_reward = reward_fn(x).mean().item()
        kl = 0.0 if model is reference_run.model else path_kl_nats(model, reference_run.model,
                                                                     x, process, mask_id)
        return (label, mean_reward, kl, sample_entropy_bits(x, mask_id),
                repr(corpus.vocab.decode(x[0].tolist())))

    rows = []
    for beta in betas:
        result = finetune(FinetuneOptions(reference, reward, beta, k, reward_steps=reward_steps),
                          Session(out=str(out_dir / f"beta_{beta:g}"), threads=threads,
                                  quiet=quiet, device="cpu"), steps=steps, lr=lr)
        if not rows:
            rows.append(describe(reference_run.model, "reference", result["reward_fn"]))
        rows.append(describe(result["student"], f"{beta:g}", result["reward_fn"]))
    points = [(float(r[0]), r[2], r[1]) for r in rows[1:]]
    rows = [(r[0], f"{r[1]:.3f}", f"{r[2]:.3f}", f"{r[3]:.2f}", r[4]) for r in rows]
    header = ["beta", "mean reward", "path KL to ref (nats/token)", "symbol entropy (bits)",
              "sample"]
    table = write_table(out_dir / "beta_sweep.md", header, rows)
    _plot_sweep(points, float(rows[0][1]), reward, out_dir / "beta_sweep.png")
    return table


def _plot_sweep(points: list, reference_reward: float, reward: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4))
    axis.plot([p[1] for p in points], [p[2] for p in points], "o-")
    for beta, kl, value in points:
        axis.annotate(f"beta={beta:g}", (kl, value), textcoords="offset points", xytext=(5, 5))
    axis.axhline(reference_reward, color="gray", linestyle=":", label="reference")
    axis.set(xlabel="path KL to the reference (nats per token)",
             ylabel=f"mean reward ({reward})", title="reward vs divergence")
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
