"""Fused vs reference loss at the demo's shape, forward + backward, in this process: median time
and peak extra memory. `tcsm demo` prints the time columns from its own helper
(tcsm_kernels/train/loss_speed.py); this adds the memory the fused loss saves.

    python benchmarks/demo_loss_table.py [--rows 4096] [--vocab 32768] [--repeats 3]

Memory on CPU is the process's peak resident size during the call (the peak counter is reset
through /proc/self/clear_refs just before) minus the resident size before it, so it counts
everything the call allocates, the (N, V) gradient included. Large buffers are mapped and unmapped
directly (glibc's mmap threshold), so nothing freed earlier hides in the allocator. On CUDA it is
the allocator's peak above the memory allocated before the call. The full suite (run_all.py)
measures memory in fresh processes instead.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, List, Optional

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from memory_probe import reset_peak_rss, status_bytes  # noqa: E402

from tcsm_kernels import _backend, fused_tcsm_loss, reference  # noqa: E402


def peak_counter_resettable() -> bool:
    try:
        reset_peak_rss()
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
            measurable = peak_counter_resettable()
            before = status_bytes("VmRSS")
        start = time.perf_counter()
        loss_fn(logits, target, **options).backward()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if cuda:
            peak = torch.cuda.max_memory_allocated() - before
        else:
            peak = status_bytes("VmHWM") - before if measurable else None
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    print(format_table(loss_table(args.rows, args.vocab, args.repeats, device=args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
