"""Peak extra memory of one loss + backward, in its own process:
python benchmarks/memory_probe.py IMPL CASE N V -> one JSON line.

The logits are an activation, as after an LM head: hidden (N, 64) @ W (64, V). The baseline is
the resident size after that forward; the result is the peak RSS during loss + backward minus
that baseline (conservative: an earlier, higher peak could only inflate it)."""
import os
import json
import resource
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import loss_case, loss_impl  # noqa: E402


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(impl, case, rows, vocab):
    rows, vocab = int(rows), int(vocab)
    fn = loss_impl(impl)
    logits0, target, kw = loss_case(case, rows, vocab)
    del logits0
    hidden = torch.randn(rows, 64, requires_grad=True)
    head = torch.randn(64, vocab, requires_grad=True)
    # One-time costs (torch.compile's compilation, the first custom-op call importing dynamo)
    # are paid on a small input outside the measured window.
    small = torch.randn(8, 64, requires_grad=True) @ head
    fn(small, target[:8], **loss_case(case, 8, vocab)[2]).backward()
    head.grad = None
    logits = hidden @ head
    before = current_rss_bytes()
    fn(logits, target, **kw).backward()
    extra = peak_rss_bytes() - before
    print(json.dumps({"extra_bytes": extra, "logits_bytes": rows * vocab * 4}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
