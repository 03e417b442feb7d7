"""topk_concrete_scores (docs/math.md 6) fused vs the torch baseline (torch.topk + gather +
logsumexp), side by side in one run.

Run: python benchmarks/run_all.py (or pytest benchmarks/test_bench_topk.py --benchmark-json=...).
Shapes: N = TCSM_BENCH_ROWS (4096) rows, V in TCSM_BENCH_TOPK_VOCABS (32768,128256), k in
(8, 64, 256), float32 teacher logits. Each result records achieved GB/s (the N V 4 bytes of
logits read / median time) and the copy-bandwidth ceiling measured in the same run.
"""
import os

import pytest
import torch

from common import sync
from conftest import available_bytes

ROWS = int(os.environ.get("TCSM_BENCH_ROWS", "4096"))
VOCABS = [int(v) for v in os.environ.get("TCSM_BENCH_TOPK_VOCABS", "32768,128256").split(",")]
KS = (8, 64, 256)
ROUNDS = int(os.environ.get("TCSM_BENCH_ROUNDS", "5"))
IMPLS = ("fused", "torch")
PARAMS = [(vocab, k, impl) for vocab in VOCABS for k in KS for impl in IMPLS]


def torch_topk_scores(u, target, k, temperature=1.0):
    """The eager baseline: torch.topk, two gathers and a logsumexp (topk's tie order is not
    specified, which the fused op pins down)."""
    values, indices = torch.topk(u, k, dim=1)
    log_ratios = (values - u.gather(1, target[:, None])) / temperature
    return indices, log_ratios, torch.logsumexp(u / temperature, dim=1)


def topk_impl(name: str):
    if name == "fused":
        from tcsm_kernels.ops.topk_scores import topk_concrete_scores
        return lambda u, target, k: topk_concrete_scores(u, target, k, check=False)
    if name == "torch":
        return torch_topk_scores
    raise ValueError(f"unknown implementation {name!r}")


@pytest.mark.parametrize("vocab,k,impl", PARAMS, ids=[f"V{v}-k{k}-{i}" for v, k, i in PARAMS])
def test_topk_scores(benchmark, device, ceiling_gbs, vocab, k, impl):
    logits_bytes = ROWS * vocab * 4
    if 3 * logits_bytes > 0.8 * available_bytes(device):
        pytest.skip(f"needs about {3 * logits_bytes / 2**30:.0f} GiB at N={ROWS}, V={vocab}")
    benchmark.group = f"topk k={k} V={vocab}"
    g = torch.Generator(device=device).manual_seed(0)
    u = torch.randn(ROWS, vocab, generator=g, device=device)
    target = torch.randint(0, vocab, (ROWS,), generator=g, device=device)
    fn = topk_impl(impl)

    def once():
        fn(u, target, k)
        sync(device)

    once()  # warm-up (and Triton compilation)
    benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(dict(
        kind="topk", case=f"k={k}", vocab=vocab, rows=ROWS, impl=impl, device=device,
        median_s=median, gbs=logits_bytes / median / 1e9, ceiling_gbs=ceiling_gbs))
