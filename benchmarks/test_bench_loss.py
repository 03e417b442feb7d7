"""fused_tcsm_loss forward+backward vs eager reference vs torch.compile(reference) (and
F.cross_entropy for the data-target kl case), side by side in one run.

Run: python benchmarks/run_all.py (or pytest benchmarks/test_bench_loss.py --benchmark-json=...).
Shapes: N = TCSM_BENCH_ROWS (4096) rows, V in TCSM_BENCH_VOCABS (32768,50258,128256), float32.
Each result records achieved GB/s (bytes the op must move / median time), the copy-bandwidth
ceiling measured in the same run, and peak extra memory of loss+backward in a fresh process.
"""
import os

import pytest

from common import loss_bytes, loss_case, loss_impl, peak_extra_memory, sync
from conftest import available_bytes

ROWS = int(os.environ.get("TCSM_BENCH_ROWS", "4096"))
VOCABS = [int(v) for v in os.environ.get("TCSM_BENCH_VOCABS", "32768,50258,128256").split(",")]
ROUNDS = int(os.environ.get("TCSM_BENCH_ROUNDS", "5"))
CASES = {"kl-data": ["fused", "eager", "compiled", "torch-ce"],
         "gkl-dense": ["fused", "eager", "compiled"],
         "gkl-topk": ["fused", "eager", "compiled"]}
# (N, V) float32 buffers alive at the peak of each implementation, for the fits-in-memory check
LIVE_BUFFERS = {"fused": 4, "torch-ce": 5, "eager": 10, "compiled": 8}
PARAMS = [(case, vocab, impl) for case, impls in CASES.items() for vocab in VOCABS for impl in impls]


@pytest.mark.parametrize("case,vocab,impl", PARAMS,
                         ids=[f"{c}-V{v}-{i}" for c, v, i in PARAMS])
def test_loss_forward_backward(benchmark, device, ceiling_gbs, case, vocab, impl):
    need = LIVE_BUFFERS[impl] * ROWS * vocab * 4 * (1.5 if case == "gkl-dense" else 1)
    if need > 0.8 * available_bytes(device):
        pytest.skip(f"{impl} would need about {need / 2**30:.0f} GiB at N={ROWS}, V={vocab}")
    benchmark.group = f"loss {case} V={vocab}"
    logits, target, kw = loss_case(case, ROWS, vocab, device=device)
    fn = loss_impl(impl)
    logits.requires_grad_()

    def once():
        logits.grad = None
        fn(logits, target, **kw).backward()
        sync(device)

    once()  # warm-up (and compilation for torch.compile)
    benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    median = benchmark.stats.stats.median
    moved = loss_bytes(case, ROWS, vocab)
    info = dict(case=case, vocab=vocab, rows=ROWS, impl=impl, device=device,
                median_s=median, gbs=moved / median / 1e9, ceiling_gbs=ceiling_gbs)
    if device == "cpu" and os.environ.get("TCSM_BENCH_MEMORY", "1") == "1":
        info.update(peak_extra_memory(impl, case, ROWS, vocab))
        if impl == "fused":  # in-place backward: same kernel, gradient written over the logits
            inplace = peak_extra_memory("fused-inplace", case, ROWS, vocab)
            info["inplace_extra_bytes"] = inplace.get("extra_bytes")
    benchmark.extra_info.update(info)
