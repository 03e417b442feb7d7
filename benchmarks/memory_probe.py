"""Peak extra memory of one loss + backward, in its own process:
python benchmarks/memory_probe.py IMPL CASE N V -> one JSON line.

The logits are an activation, as after an LM head: hidden (N, 64) @ W (64, V). The baseline is
the resident size after that forward (with the kernel's peak counter reset there); the result
is the peak RSS during loss + backward minus that baseline."""
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import loss_case, loss_impl  # noqa: E402


def status_bytes(field: str) -> int:
    """A VmRSS/VmHWM-style field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0). Needed because a process started by
    fork + exec inherits its parent's peak, which would otherwise hide the child's own."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


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
    reset_peak_rss()
    before = status_bytes("VmRSS")
    fn(logits, target, **kw).backward()
    extra = status_bytes("VmHWM") - before
    print(json.dumps({"extra_bytes": extra, "logits_bytes": rows * vocab * 4}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
