"""Shared benchmark pieces: implementations under test, the machine's copy bandwidth measured
in the same run (the ceiling a memory-bound kernel is judged against) and peak extra memory
measured in a fresh process."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def copy_bandwidth_gbs(nbytes: int = 1 << 29, repeats: int = 7, device: str = "cpu") -> float:
    """GB/s of dst.copy_(src) counting read + write (the STREAM 'copy' convention), from the
    median of ``repeats`` copies after one warm-up: the same statistic as the ops' medians."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for rep in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if rep:
            times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times) / 1e9


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def loss_case(case: str, rows: int, vocab: int, device: str = "cpu", k: int = 64, seed: int = 0):
    """(logits (N, V) float32, target (N,), keyword arguments) for a benchmark case."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g, device=device)
    target = torch.randint(0, vocab, (rows,), generator=g, device=device)
    if case == "kl-data":
        return logits, target, dict(divergence="kl")
    if case == "gkl-dense":
        teacher = torch.randn(rows, vocab, generator=g, device=device)
        return logits, target, dict(divergence="gkl", teacher_logits=teacher)
    if case == "gkl-topk":
        indices = torch.randint(0, vocab, (rows, k), generator=g, device=device)
        log_ratios = torch.randn(rows, k, generator=g, device=device)
        return logits, target, dict(divergence="gkl", objective="score",
                                    teacher_topk=(indices, log_ratios))
    raise ValueError(f"unknown case {case!r}")


def loss_bytes(case: str, rows: int, vocab: int, k: int = 64) -> int:
    """Bytes a fused forward+backward must move at least: read logits, write the gradient
    (float32), read the dense teacher; the top-K teacher and ids are O(N K)."""
    per_row = 8 * vocab + (4 * vocab if case == "gkl-dense" else 0) + 12 * k + 16
    return rows * per_row


def loss_impl(name: str):
    """A callable (logits, target, **kw) -> scalar loss for an implementation name."""
    import torch.nn.functional as F

    import tcsm_kernels
    from tcsm_kernels import reference

    if name == "fused":
        return lambda z, t, **kw: tcsm_kernels.fused_tcsm_loss(z, t, **kw)
    if name == "fused-inplace":
        return lambda z, t, **kw: tcsm_kernels.fused_tcsm_loss(z, t, inplace_backward=True, **kw)
    if name == "eager":
        return lambda z, t, **kw: reference.tcsm_loss(z, t, **kw)
    if name == "compiled":
        return torch.compile(lambda z, t, **kw: reference.tcsm_loss(z, t, **kw), dynamic=False)
    if name == "torch-ce":
        return lambda z, t, **kw: F.cross_entropy(z, t)
    raise ValueError(f"unknown implementation {name!r}")


def peak_extra_memory(impl: str, case: str, rows: int, vocab: int, timeout: float = 900) -> dict:
    """Run one loss+backward in a fresh process (logits as an LM-head activation) and return
    {"extra_bytes": peak RSS growth during loss+backward, "logits_bytes": N V 4}."""
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "memory_probe.py"), impl, case, str(rows), str(vocab)],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT))
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])
