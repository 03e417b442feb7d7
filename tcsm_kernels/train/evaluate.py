"""Validation NELBO in bits per token (docs/math.md 8), by Monte Carlo over t with fixed seeds.

For the factorised path of math.md 1 the model's reverse rate at a position that may change is
R(x -> y) = w(t) p(y | x_t) for y != x, with w(t) = dkappa / (1 - kappa); the conditional rate
given the clean token is w(t) [y = x_1]. The path KL between the two processes bounds
-log p(x_1), and per position it is the generalized KL of the rates:

    w(t) [1 - p(x_t | x_t) - [x_t != x_1] (1 + log p(x_1 | x_t))].

Masked process: only masked positions may change and p(mask) = 0, so this is
w(t) (-log p(x_1)) on masked positions. Uniform process: every position, as written.
Each sequence gets ``time_samples`` stratified times t_k = (k + u) / K with one uniform u, so the
K samples cover [0, 1) evenly (far lower variance than K independent times).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .data import entropies, eval_windows, read_windows
from .progress import ProgressBar
from .run import autocast_dtype, make_process, mask_token


def position_nelbo(logits: torch.Tensor, x1: torch.Tensor, x_t: torch.Tensor,
                   weight: torch.Tensor, mask_id: Optional[int]) -> torch.Tensor:
    """(B, L) NELBO terms in nats from logits (B, L, V), clean x1 and noisy x_t (B, L), and the
    time weight w(t) (B, 1)."""
    logits = logits.float()
    if mask_id is not None:
        logits = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), -math.inf)
    logp = torch.log_softmax(logits, dim=-1)
    logp_clean = logp.gather(-1, x1[..., None])[..., 0]
    p_stay = logp.gather(-1, x_t[..., None])[..., 0].exp()
    moved = (x_t != x1).float()
    terms = weight * (1 - p_stay - moved * (1 + logp_clean))
    if mask_id is not None:
        terms = torch.where(x_t == mask_id, terms, torch.zeros_like(terms))
    return terms


@dataclass
class NelboResult:
    bits_per_token: float
    stderr_bits: float  # standard error over sequences
    sequences: int
    time_samples: int


@torch.no_grad()
def nelbo_bits(model, split: np.ndarray, process, mask_id: Optional[int], *, seq_len: int,
               time_samples: int = 8, max_sequences: int = 0, batch_size: int = 256,
               seed: int = 1234, device: torch.device = torch.device("cpu"),
               autocast: Optional[torch.dtype] = None, progress: bool = False) -> NelboResult:
    """Mean NELBO per token over non-overlapping validation windows (math.md 1 weights).

    The noise of window batch j comes from a generator seeded with (seed, j): two calls with the
    same arguments see the same times and masks, so two models compare without Monte Carlo noise.
    ``progress``: a progress bar over the model calls on stderr.
    """
    was_training = model.training
    model.eval()
    starts = eval_windows(split, seq_len, max_sequences)
    per_sequence = []
    cast = (torch.autocast(device.type, dtype=autocast) if autocast is not None
            else contextlib.nullcontext())
    batches = range(0, len(starts), batch_size)
    bar = ProgressBar(len(batches) * time_samples, 0, progress, label="evaluating")
    for j, begin in enumerate(batches):
        x1 = read_windows(split, starts[begin:begin + batch_size], seq_len)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + j)
        shift = torch.rand(len(x1), generator=generator)
        total = torch.zeros(len(x1), dtype=torch.float64)
        for k in range(time_samples):
            t = (k + shift) / time_samples
            x_t = process.sample(x1, t, generator=generator)
            weight = process.schedule.time_weight(t)[:, None]
            with cast:
                logits = model(x_t.to(device), t.to(device))
            terms = position_nelbo(logits, x1.to(device), x_t.to(device), weight.to(device),
                                   mask_id)
            total += terms.sum(1).double().cpu()
            bar.update(j * time_samples + k + 1, f"{begin + len(x1)}/{len(starts)} sequences")
        per_sequence.append(total / (time_samples * seq_len))
    bar.close()
    model.train(was_training)
    nats = torch.cat(per_sequence)
    stderr = nats.std().item() / math.sqrt(len(nats)) if len(nats) > 1 else float("nan")
    return NelboResult(nats.mean().item() / math.log(2), stderr / math.log(2), len(nats),
                       time_samples)


def evaluate_run(trained, *, time_samples: int = 8, max_sequences: int = 0, seed: int = 1234,
                 batch_size: int = 256, progress: bool = False) -> dict:
    """NELBO of a trained run on its validation split, with the split's unigram and bigram
    entropies (bits per token) for comparison."""
    config, corpus = trained.config, trained.corpus
    result = nelbo_bits(trained.model, corpus.val, make_process(config, corpus),
                        mask_token(config, corpus), seq_len=config.seq_len,
                        time_samples=time_samples, max_sequences=max_sequences,
                        batch_size=batch_size, seed=seed, device=trained.device,
                        autocast=autocast_dtype(config, trained.device), progress=progress)
    unigram, bigram = entropies(corpus.val, corpus.vocab.size)
    return {"step": trained.step, "nelbo_bits": result.bits_per_token,
            "stderr_bits": result.stderr_bits, "sequences": result.sequences,
            "time_samples": time_samples, "val_tokens": len(corpus.val),
            "unigram_bits": unigram, "bigram_bits": bigram}


def format_evaluation(result: dict) -> str:
    """The lines of an ``evaluate_run`` result, the NELBO set against the bigram entropy."""
    return "\n".join([
        f"validation split: {result['val_tokens']:,} tokens, {result['sequences']} sequences, "
        f"{result['time_samples']} stratified times each",
        f"  NELBO (this model)          {result['nelbo_bits']:.3f} +- "
        f"{result['stderr_bits']:.3f} bits per token",
        f"  bigram entropy H(x_i|x_i-1) {result['bigram_bits']:.3f} bits per token",
        f"  unigram entropy H(x)        {result['unigram_bits']:.3f} bits per token",
        f"  NELBO - bigram entropy      {result['nelbo_bits'] - result['bigram_bits']:+.3f} bits "
        f"per token ({'below' if result['nelbo_bits'] < result['bigram_bits'] else 'not below'} "
        "the bigram bar)"])
