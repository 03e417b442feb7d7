"""Peak extra memory of one fused-linear benchmark loss + backward, in its own process:
python benchmarks/linear_memory_probe.py IMPL DIVERGENCE N D V -> one JSON line.

hidden (N, D) and head (V, D) are leaves that require grad. The baseline is the resident size
before the loss; the result is the peak RSS during loss + backward minus that baseline, less
the unavoidable gradients of hidden and head (N D + V D float32)."""
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from linear_common import linear_case, linear_impl  # noqa: E402
from memory_probe import reset_peak_rss, status_bytes  # noqa: E402


def main(impl, divergence, rows, dim, vocab):
    rows, dim, vocab = int(rows), int(dim), int(vocab)
    fn = linear_impl(impl, divergence)
    small = [t.requires_grad_() if t.is_floating_point() else t
             for t in linear_case(8, dim, vocab)]
    fn(*small).backward()  # one-time costs (compilation, first custom-op call) outside
    hidden, head, target = linear_case(rows, dim, vocab)
    hidden.requires_grad_()
    head.requires_grad_()
    reset_peak_rss()
    before = status_bytes("VmRSS")
    fn(hidden, head, target).backward()
    unavoidable = (rows + vocab) * dim * 4
    extra = status_bytes("VmHWM") - before - unavoidable
    print(json.dumps({"extra_bytes": extra, "logits_bytes": rows * vocab * 4}))


if __name__ == "__main__":
    main(*sys.argv[1:6])
