"""One CTMC reverse step (docs/math.md 7) on the same logits: fused ctmc_step vs eager (softmax +
torch.multinomial + jump decision) vs discrete flow matching's Euler-step operations (softmax,
multinomial, one-hot rate matrix, jump, second categorical), side by side in one run; plus
whole-sampler tokens/s with a small denoiser, with and without caching.

Shapes: rows in TCSM_BENCH_STEP_ROWS (4096,16384), V in TCSM_BENCH_STEP_VOCABS (32768,50258),
float32 logits. GB/s counts the logits read once (N V 4 bytes), the floor for any sampler.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from common import sync

STEP_ROWS = [int(n) for n in os.environ.get("TCSM_BENCH_STEP_ROWS", "4096,16384").split(",")]
STEP_VOCABS = [int(v) for v in os.environ.get("TCSM_BENCH_STEP_VOCABS", "32768,50258").split(",")]
ROUNDS = int(os.environ.get("TCSM_BENCH_ROUNDS", "5"))
MASK_ID = 0
PARAMS = [(n, v, impl) for n in STEP_ROWS for v in STEP_VOCABS
          for impl in ("fused", "eager", "flow-matching")]


def eager_step(logits, x, jump_prob, generator):
    """The straightforward masked step: softmax, multinomial, then a jump decision."""
    scores = logits.clone()
    scores[:, MASK_ID] = float("-inf")
    probs = scores.softmax(-1)
    x1 = torch.multinomial(probs, 1, generator=generator)[:, 0]
    jump = (x == MASK_ID) & (torch.rand(x.shape, generator=generator, device=x.device) < jump_prob)
    return torch.where(jump, x1, x)


def flow_matching_step(logits, x, h, kappa, dkappa, generator):
    """Discrete flow matching's Euler step for a mixture path (no divergence-free term): draw
    x1 ~ p_1|t, rate u = dkappa / (1 - kappa) * (one_hot(x1) where x1 != x_t), jump with
    probability 1 - exp(-h * sum(u)) to a draw from u."""
    probs = logits.softmax(-1)
    x1 = torch.multinomial(probs, 1, generator=generator)[:, 0]
    vocab = logits.shape[-1]
    rate = dkappa / (1 - kappa) * F.one_hot(x1, vocab).to(logits.dtype)
    rate = torch.where(F.one_hot(x, vocab).bool(), torch.zeros_like(rate), rate)
    intensity = rate.sum(-1)
    jump = torch.rand(x.shape, generator=generator, device=x.device) < 1 - torch.exp(-h * intensity)
    out = x.clone()
    if bool(jump.any()):
        out[jump] = torch.multinomial(rate[jump], 1, generator=generator)[:, 0]
    return out


@pytest.mark.parametrize("rows,vocab,impl", PARAMS, ids=[f"N{n}-V{v}-{i}" for n, v, i in PARAMS])
def test_ctmc_step(benchmark, device, ceiling_gbs, rows, vocab, impl):
    from tcsm_kernels import ctmc_step

    benchmark.group = f"ctmc step N={rows} V={vocab}"
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(rows, vocab, generator=g, device=device)
    x = torch.where(torch.rand(rows, generator=g, device=device) < 0.5, MASK_ID,
                    torch.randint(1, vocab, (rows,), generator=g, device=device))
    jump = torch.tensor(0.1, device=device)
    if impl == "fused":
        def once():
            ctmc_step(logits, x, jump, mask_id=MASK_ID, seed=1)
            sync(device)
    elif impl == "eager":
        def once():
            eager_step(logits, x, jump, g)
            sync(device)
    else:
        def once():
            flow_matching_step(logits, x, 0.1, 0.5, 1.0, g)
            sync(device)
    once()
    benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(kind="ctmc-step", case="masked", rows=rows, vocab=vocab,
                                impl=impl, device=device, median_s=median,
                                gbs=rows * vocab * 4 / median / 1e9, ceiling_gbs=ceiling_gbs)


class ToyDenoiser(torch.nn.Module):
    """Embedding + one MLP layer + tied head: a small, fast stand-in model (B, L) -> (B, L, V)."""

    def __init__(self, vocab, width=64):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)
        self.calls = 0

    def forward(self, x_t, t):
        self.calls += 1
        h = torch.tanh(self.mix(self.embed(x_t)) + t[:, None, None])
        return h @ self.embed.weight.T


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
def test_sampler_tokens_per_second(benchmark, device, ceiling_gbs, cache):
    from tcsm_kernels.sampling import sample_masked

    # more steps than tokens per sequence: many steps change no token, which caching skips
    vocab, batch, length, steps = 2048, 4, 64, 512
    model = ToyDenoiser(vocab).to(device)
    x_init = torch.full((batch, length), MASK_ID, device=device)
    benchmark.group = "sampler loop"

    def once():
        with torch.no_grad():
            sample_masked(model, x_init, steps=steps, mask_id=MASK_ID, cache=cache, seed=0)
        sync(device)

    once()
    model.calls = 0
    benchmark.pedantic(once, rounds=3, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(kind="sampler", case=f"masked exact, {steps} steps", rows=batch * length,
                                vocab=vocab, impl="cache" if cache else "no-cache", device=device,
                                median_s=median, gbs=0.0, ceiling_gbs=ceiling_gbs,
                                tokens_per_s=batch * length / median,
                                model_calls_per_run=model.calls / 3)
