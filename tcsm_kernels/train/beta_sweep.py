"""The beta sweep of reward fine-tuning: fine-tune one reference for several beta, then score
samples of each model (mean reward, path KL from the reference, symbol entropy) into a table
and a reward-vs-divergence plot."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..schedules import get_schedule
from .finetune import FinetuneOptions, finetune
from .report import pyplot, save_figure, write_table
from .run import ConfigError, load_trained, make_process, mask_token
from .trainer import Session


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
    fig, axis = pyplot().subplots(figsize=(6, 4))
    axis.plot([p[1] for p in points], [p[2] for p in points], "o-")
    for beta, kl, value in points:
        axis.annotate(f"beta={beta:g}", (kl, value), textcoords="offset points", xytext=(5, 5))
    axis.axhline(reference_reward, color="gray", linestyle=":", label="reference")
    axis.set(xlabel="path KL to the reference (nats per token)",
             ylabel=f"mean reward ({reward})", title="reward vs divergence")
    axis.legend()
    fig.tight_layout()
    save_figure(fig, path)
