"""Fused vs reference loss, forward + backward: median time and peak extra memory.

Memory on CPU is the process's peak resident size during the call (Linux: the peak counter is
reset through /proc/self/clear_refs just before) minus the resident size before it, so it counts
everything the call allocates, the (N, V) gradient included. Large buffers are mapped and unmapped
directly (glibc's mmap threshold), so nothing freed earlier hides in the allocator. On CUDA it is
the allocator's peak above the memory allocated before the call.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, List, Optional

import torch

from .. import _backend, reference


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def measure(loss_fn: Callable, logits: torch.Tensor, target: torch.Tensor, repeats: int,
            **options) -> dict:
    """Median seconds and peak extra bytes (None if unmeasurable) of loss_fn(...).backward().

    One untimed call first pays the one-time costs (loading, dispatch caches, first touch).
    """
    cuda = logits.device.type == "cuda"
    seconds, extra = [], []
    for run in range(repeats + 1):  # run 0 warms up, untimed
        logits.grad = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            measurable = _reset_peak()
            before = _rss_bytes("VmRSS")
        start = time.perf_counter()
        loss_fn(logits, target, **options).backward()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if cuda:
            peak = torch.cuda.max_memory_allocated() - before
        else:
            peak = _rss_bytes("VmHWM") - before if measurable else None
        if run:
            seconds.append(elapsed)
            extra.append(peak)
    logits.grad = None
    return {"seconds": statistics.median(seconds),
            "extra_bytes": None if None in extra else statistics.median(extra)}


def loss_table(rows: int = 4096, vocab: int = 32768, repeats: int = 3,
               divergences=("kl", "gkl"), device: str = "cpu", seed: int = 0) -> List[dict]:
    """One row per divergence: fused and reference time and memory on float32 logits
    (rows, vocab) with random data targets."""
    from ..ops.loss import fused_tcsm_loss

    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator).to(device).requires_grad_()
    target = torch.randint(0, vocab, (rows,), generator=generator).to(device)
    backend = _backend.resolve("auto", logits.device, logits.dtype)
    table = []
    for divergence in divergences:
        fused = measure(fused_tcsm_loss, logits, target, repeats, divergence=divergence)
        ref = measure(reference.tcsm_loss, logits, target, repeats, divergence=divergence)
        table.append({"divergence": divergence, "rows": rows, "vocab": vocab,
                      "backend": backend, "fused": fused, "reference": ref})
    return table


def format_table(table: List[dict]) -> str:
    """A plain-text table of ``loss_table`` results."""

    def mib(value: Optional[int]) -> str:
        return "n/a" if value is None else f"{value / 2**20:,.0f}"

    first = table[0]
    lines = [f"loss forward+backward, float32 logits N={first['rows']} x V={first['vocab']} "
             f"({first['rows'] * first['vocab'] * 4 / 2**20:,.0f} MiB), median; memory = peak "
             "above inputs, gradient included",
             f"{'divergence':<10} {'fused ms':>9} {'ref ms':>9} {'speed-up':>8} "
             f"{'fused MiB':>10} {'ref MiB':>9}  fused backend"]
    for row in table:
        fused, ref = row["fused"], row["reference"]
        lines.append(f"{row['divergence']:<10} {fused['seconds'] * 1e3:>9.1f} "
                     f"{ref['seconds'] * 1e3:>9.1f} {ref['seconds'] / fused['seconds']:>7.1f}x "
                     f"{mib(fused['extra_bytes']):>10} {mib(ref['extra_bytes']):>9}  "
                     f"{row['backend']}")
    return "\n".join(lines)
