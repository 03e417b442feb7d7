"""The demo's speed table: ``fused_tcsm_loss`` against the reference loss, forward + backward,
median wall time on random data targets. Time only; the same comparison with peak memory is
the benchmark ``benchmarks/demo_loss_table.py`` (source checkout)."""
from __future__ import annotations

import statistics
import time
from typing import Callable, List

import torch

from .. import _backend, reference


def median_seconds(call: Callable[[], None], repeats: int, device: torch.device) -> float:
    """Median wall time of ``call()`` over ``repeats`` calls, after one untimed call that pays
    the one-time costs (loading, dispatch caches, first touch)."""
    seconds = []
    for run in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if run:
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def loss_table(rows: int = 4096, vocab: int = 32768, repeats: int = 3,
               divergences=("kl", "gkl"), device: str = "cpu", seed: int = 0) -> List[dict]:
    """One row per divergence: fused and reference median seconds of forward + backward on
    float32 logits (rows, vocab) with random data targets."""
    from ..ops.loss import fused_tcsm_loss

    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator).to(device).requires_grad_()
    target = torch.randint(0, vocab, (rows,), generator=generator).to(device)
    backend = _backend.resolve("auto", logits.device, logits.dtype)

    def timed(loss_fn, divergence: str) -> dict:
        def call():
            logits.grad = None
            loss_fn(logits, target, divergence=divergence).backward()
        seconds = median_seconds(call, repeats, logits.device)
        logits.grad = None
        return {"seconds": seconds}

    return [{"divergence": divergence, "rows": rows, "vocab": vocab, "backend": backend,
             "fused": timed(fused_tcsm_loss, divergence),
             "reference": timed(reference.tcsm_loss, divergence)}
            for divergence in divergences]


def format_table(table: List[dict]) -> str:
    """A plain-text table of ``loss_table`` results."""
    first = table[0]
    lines = [f"loss forward+backward, float32 logits N={first['rows']} x V={first['vocab']} "
             f"({first['rows'] * first['vocab'] * 4 / 2**20:,.0f} MiB), median of "
             "repeated calls",
             f"{'divergence':<10} {'fused ms':>9} {'ref ms':>9} {'speed-up':>8}  fused backend"]
    for row in table:
        fused, ref = row["fused"]["seconds"], row["reference"]["seconds"]
        lines.append(f"{row['divergence']:<10} {fused * 1e3:>9.1f} {ref * 1e3:>9.1f} "
                     f"{ref / fused:>7.1f}x  {row['backend']}")
    return "\n".join(lines)
