"""Side-by-side wall time of the C++ kernels from two builds of tcsm_kernels (e.g. before and
after a change), interleaved so that both see the same machine load.

    python benchmarks/compare_cpu_kernels.py BASE_ROOT NEW_ROOT [--rounds 3] [--rows 4096]
        [--cols 32768] [--cases dense_gkl_distrib,dense_gkl_distrib/inplace]

Each ROOT is a directory holding a built ``tcsm_kernels`` package. Every round runs one worker
process per build, alternating; a worker times (median of 5, after one warm-up) the copy
bandwidth (dst.copy_(src), 8 N V bytes) and, at N x V float32 with 2 threads, forward+backward
of fused_tcsm_loss(backend="cpp") for data kl (8 N V bytes: read logits, write grad), dense gkl
distrib (12 N V: logits, teacher, grad), sparse gkl K=64 (8 N V), each as a default call and
with the gradient written in place, and ctmc_step (4 N V).
Reported: per build the median over rounds of each worker's median, GB/s and the fraction of
copy bandwidth it measured, and new / base time ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

LOSSES = {"data_kl": 8, "dense_gkl_distrib": 12, "sparse_gkl_k64": 8}
# "<loss>": default call (reduction mean: a fresh (N, V) gradient, scaled by 1/N in backward);
# "<loss>/inplace": inplace_backward=True, reduction sum (no allocation, no scaling pass; the
# logits are restored, untimed, before each call): the kernel's own cost.
CASES = {"copy": 8, **LOSSES, **{f"{name}/inplace": b for name, b in LOSSES.items()},
         "ctmc_step": 4}


def worker(root: str, rows: int, cols: int, reps: int, cases: list) -> dict:
    sys.path.insert(0, root)
    import torch

    import tcsm_kernels
    from tcsm_kernels import ctmc_step, fused_tcsm_loss

    assert tcsm_kernels.__file__.startswith(root), tcsm_kernels.__file__
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, cols, generator=gen) * 3
    teacher = torch.randn(rows, cols, generator=gen) * 3
    target = torch.randint(0, cols, (rows,), generator=gen)
    topk_idx = torch.randint(0, cols, (rows, 64), generator=gen)
    topk_rho = torch.randn(rows, 64, generator=gen)
    dst = torch.empty_like(logits)
    x = torch.full((rows,), cols - 1, dtype=torch.int64)
    jump = torch.full((rows,), 0.5)

    scratch = torch.empty_like(logits)

    def loss_step(**kw):
        z = logits.detach().requires_grad_()
        fused_tcsm_loss(z, target, backend="cpp", check=False, **kw).backward()

    def loss_step_inplace(**kw):
        z = scratch.requires_grad_()
        fused_tcsm_loss(z, target, backend="cpp", check=False, inplace_backward=True,
                        reduction="sum", **kw).backward()
        z.grad = None
        z.requires_grad_(False)

    def restore():
        scratch.copy_(logits)

    teacher_cases = {
        "data_kl": dict(divergence="kl"),
        "dense_gkl_distrib": dict(teacher_logits=teacher, divergence="gkl", objective="distrib"),
        "sparse_gkl_k64": dict(teacher_topk=(topk_idx, topk_rho), divergence="gkl",
                               objective="score"),
    }

    runs = {"copy": (None, lambda: dst.copy_(logits))}
    for name, kw in teacher_cases.items():
        runs[name] = (None, lambda kw=kw: loss_step(**kw))
    for name, kw in teacher_cases.items():
        runs[f"{name}/inplace"] = (restore, lambda kw=kw: loss_step_inplace(**kw))
    runs["ctmc_step"] = (None, lambda: ctmc_step(logits, x, jump, mask_id=cols - 1,
                                                 backend="cpp", check=False))
    out = {}
    for name in cases:
        prepare, fn = runs[name]
        times = []
        for rep in range(reps + 1):  # the first call warms up
            if prepare is not None:
                prepare()
            t0 = time.perf_counter()
            fn()
            if rep:
                times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=32768)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated subset of: " + ", ".join(CASES))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = list(dict.fromkeys(["copy", *args.cases.split(",")]))  # copy: the % column
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown --cases {unknown}; choose from {list(CASES)}")
    if args.worker:
        print(json.dumps(worker(args.worker, args.rows, args.cols, args.reps, cases)))
        return
    results = {"base": [], "new": []}
    for _ in range(args.rounds):
        for label in ("base", "new"):
            root = getattr(args, label)
            proc = subprocess.run(
                [sys.executable, __file__, args.base, args.new, "--worker", root,
                 "--rows", str(args.rows), "--cols", str(args.cols), "--reps", str(args.reps),
                 "--cases", ",".join(cases)],
                check=True, capture_output=True, text=True)
            results[label].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    elements = args.rows * args.cols
    med = {label: {name: statistics.median(r[name] for r in runs) for name in cases}
           for label, runs in results.items()}
    print(f"N={args.rows} V={args.cols} float32, 2 threads, {args.rounds} interleaved rounds")
    print(f"{'case':26s} {'base ms':>9s} {'GB/s':>6s} {'%copy':>6s} {'new ms':>9s} {'GB/s':>6s}"
          f" {'%copy':>6s} {'new/base':>8s}")
    for name in cases:
        bytes_per = CASES[name]
        row = [f"{name:26s}"]
        for label in ("base", "new"):
            t = med[label][name]
            gbs = bytes_per * elements / t / 1e9
            copy_gbs = CASES["copy"] * elements / med[label]["copy"] / 1e9
            row.append(f"{t * 1e3:9.1f} {gbs:6.1f} {100 * gbs / copy_gbs:5.0f}%")
        row.append(f"{med['new'][name] / med['base'][name]:8.3f}")
        print(" ".join(row))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
