"""Rewards r(x) of sequences for reward fine-tuning, and the differences
r(x with x_i = y) - r(x) at candidate tokens y that the tilted target needs.

A rule-based reward (vowel count) scores every neighbour exactly; a learned, differentiable
reward (a classifier of the corpus' two halves) is taken to first order in its one-hot input
(one backward).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .data import TokenCorpus, batch_starts, read_windows, step_generator
from .run import ConfigError

REWARDS = ("vowels", "classifier")
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
                     batch_size: int = 64) -> Tuple[SequenceClassifier, float]:
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


def make_reward(name: str, corpus: TokenCorpus, seq_len: int, seed: int,
                classifier_steps: int) -> Tuple[object, dict]:
    """The reward ``name`` (one of REWARDS) and a description of it for the run's records."""
    if name == "vowels":
        return VowelReward(corpus.vocab), {"reward": "vowels: number of vowels"}
    classifier, accuracy = train_classifier(corpus, seq_len, classifier_steps, seed)
    return classifier, {"reward": "classifier: log-odds of the corpus' second half",
                        "classifier_accuracy": accuracy}


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


def reward_deltas(reward, x: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """r(x with x_i = y) - r(x) (B, L, k): first order for a differentiable reward, else exact."""
    deltas = taylor_reward_deltas if reward.differentiable else exact_reward_deltas
    return deltas(reward, x, candidates)
