"""Vocabulary-parallel loss over P gloo processes on one machine: time per call (forward +
backward) and bytes each rank sends through collectives, against gathering the logits shards
and running the single-process fused loss on the full (N, V) logits. The default (the fused
shard pass) runs beside backend="reference" (the reference formulas on the shard, labelled).

    python benchmarks/bench_vocab_parallel.py [--rows 4096] [--vocab 128256] [--procs 2]

Bytes are counted by wrapping torch.distributed's collectives in each rank (the tensors each
call sends), not estimated. Prints a markdown table; with --json PATH also writes it.
"""
import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tcsm_kernels import fused_tcsm_loss, release_buffer_cache
from tcsm_kernels.distributed import vocab_parallel_tcsm_loss

SENT = {"bytes": 0}


def _count(fn):
    def wrapped(*args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        for a in args:
            if isinstance(a, (list, tuple)):
                tensors += [t for t in a if isinstance(t, torch.Tensor)]
        if fn.__name__ == "all_gather":  # sends its input once (args: output list, input)
            tensors = [args[1]]
        SENT["bytes"] += sum(t.numel() * t.element_size() for t in tensors)
        return fn(*args, **kwargs)
    return wrapped


def _timed(step, repeats):
    times, sent = [], []
    for _ in range(repeats + 1):  # the first call warms up
        dist.barrier()
        SENT["bytes"] = 0
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        sent.append(SENT["bytes"])
    return statistics.median(times[1:]), sent[-1]


def _worker(rank, procs, port, rows, vocab, repeats, divergence, out):
    torch.set_num_threads(max(1, (os.cpu_count() or procs) // procs))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=procs)
    dist.all_reduce = _count(dist.all_reduce)
    dist.all_gather = _count(dist.all_gather)
    widths = [vocab // procs + (r < vocab % procs) for r in range(procs)]
    start, width = sum(widths[:rank]), widths[rank]
    g = torch.Generator().manual_seed(rank)
    shard = torch.randn(rows, width, generator=g)
    target = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(0))

    leaf = shard.clone().requires_grad_()

    def parallel(**options):
        def step():
            leaf.grad = None
            vocab_parallel_tcsm_loss(leaf, target, vocab_start=start, vocab_size=vocab,
                                     divergence=divergence, **options).backward()
        return step

    def gathered():
        # all_gather needs equal shapes: shards padded to the widest, trimmed after
        padded = torch.zeros(rows, max(widths))
        padded[:, :width] = shard
        parts = [torch.empty_like(padded) for _ in widths]
        dist.all_gather(parts, padded)
        full = torch.cat([p[:, :w] for p, w in zip(parts, widths)], 1).requires_grad_()
        fused_tcsm_loss(full, target, divergence=divergence).backward()
        full.grad[:, start:start + width].contiguous()  # this rank's shard gradient

    result = {}
    for name, step in (("vocab_parallel_tcsm_loss (default: fused shard pass)", parallel()),
                       ("vocab_parallel_tcsm_loss, backend='reference'",
                        parallel(backend="reference")),
                       ("all_gather + fused_tcsm_loss", gathered)):
        seconds, sent = _timed(step, repeats)
        result[name] = dict(seconds=seconds, bytes_sent=sent)
        leaf.grad = None  # free this method's memory before the next one
        release_buffer_cache()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--divergence", default="kl")
    parser.add_argument("--json")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"/tmp/bench_vocab_parallel_{os.getpid()}.json"
    mp.spawn(_worker, args=(args.procs, port, args.rows, args.vocab, args.repeats,
                            args.divergence, out), nprocs=args.procs)
    with open(out) as f:
        result = json.load(f)
    os.remove(out)
    print(f"N={args.rows} V={args.vocab} P={args.procs} float32 divergence={args.divergence}, "
          f"forward + backward, median of {args.repeats}; bytes sent by rank 0 per call")
    print("| method | ms / call | bytes sent | bytes / row |")
    print("| --- | --- | --- | --- |")
    for name, r in result.items():
        print(f"| {name} | {1e3 * r['seconds']:.0f} | {r['bytes_sent']:,} | "
              f"{r['bytes_sent'] / args.rows:,.0f} |")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(vars(args), result=result), f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
