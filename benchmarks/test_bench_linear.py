"""Fused linear + TCSM loss vs the unfused, eager and Cut Cross-Entropy paths, and the three
matmuls alone (the op's floor), forward + backward side by side in one run.

Shapes: N = TCSM_BENCH_LINEAR_ROWS (8192), D in TCSM_BENCH_LINEAR_DIMS (512,1024), V in
TCSM_BENCH_LINEAR_VOCABS (32768,128256), float32, defaults of every implementation. Each result
records the median time and, on CPU, the peak extra memory of loss + backward in a fresh process
beyond the unavoidable gradients of hidden and head (TCSM_BENCH_MEMORY=0 skips it).
Cut Cross-Entropy (`pip install --no-deps cut-cross-entropy`, its torch_compile path runs on
CPU) is skipped where it is not installed.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from common import HERE, ROOT, sync
from conftest import available_bytes
from linear_common import IMPLS, linear_case, linear_impl, three_matmuls

ROWS = int(os.environ.get("TCSM_BENCH_LINEAR_ROWS", "8192"))
DIMS = [int(d) for d in os.environ.get("TCSM_BENCH_LINEAR_DIMS", "512,1024").split(",")]
VOCABS = [int(v) for v in os.environ.get("TCSM_BENCH_LINEAR_VOCABS", "32768,128256").split(",")]
ROUNDS = int(os.environ.get("TCSM_BENCH_ROUNDS", "3"))
# (N, V) float32 buffers alive at each implementation's peak, for the fits-in-memory check
LIVE_BUFFERS = {"fused-linear": 0.2, "unfused": 2.2, "eager": 4, "cce": 4, "matmuls": 2.2}
PARAMS = [(div, dim, vocab, impl) for div, impls in IMPLS.items() for dim in DIMS
          for vocab in VOCABS for impl in impls + ["matmuls"]]


def peak_extra(impl, divergence, dim, vocab):
    out = subprocess.run([sys.executable, os.path.join(HERE, "linear_memory_probe.py"), impl,
                          divergence, str(ROWS), str(dim), str(vocab)],
                         capture_output=True, text=True, timeout=3600, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    if out.returncode != 0:
        return {"memory_error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("divergence,dim,vocab,impl", PARAMS,
                         ids=[f"{d}-D{k}-V{v}-{i}" for d, k, v, i in PARAMS])
def test_linear_loss_forward_backward(benchmark, device, divergence, dim, vocab, impl):
    if divergence == "gkl" and impl == "matmuls":
        pytest.skip("the matmul floor is the same for every divergence (measured with kl)")
    if impl == "cce" and importlib.util.find_spec("cut_cross_entropy") is None:
        pytest.skip("cut-cross-entropy is not installed")
    need = LIVE_BUFFERS[impl] * ROWS * vocab * 4 + 3 * (ROWS + vocab) * dim * 4
    if need > 0.8 * available_bytes(device):
        pytest.skip(f"{impl} would need about {need / 2**30:.0f} GiB")
    benchmark.group = f"linear {divergence} D={dim} V={vocab}"
    hidden, head, target = linear_case(ROWS, dim, vocab, device=device)
    if impl == "matmuls":
        grad_logits = torch.randn(ROWS, vocab, device=device)

        def once():
            three_matmuls(hidden, head, grad_logits)
            sync(device)
    else:
        fn = linear_impl(impl, divergence)
        hidden.requires_grad_()
        head.requires_grad_()

        def once():
            hidden.grad = head.grad = None
            fn(hidden, head, target).backward()
            sync(device)

    once()  # warm-up (and compilation for torch.compile)
    benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    info = dict(divergence=divergence, dim=dim, vocab=vocab, rows=ROWS, impl=impl,
                device=device, median_s=benchmark.stats.stats.median)
    if impl != "matmuls" and device == "cpu" and os.environ.get("TCSM_BENCH_MEMORY", "1") == "1":
        info.update(peak_extra(impl, divergence, dim, vocab))
    benchmark.extra_info.update(info)
