"""The `tcsm` command line (grows with the training loop)."""
from __future__ import annotations

import argparse

import torch


def demo(args) -> int:
    """A short tour of the reference ops."""
    from .. import reference
    from ..processes import MaskedProcess
    from ..schedules import get_schedule

    g = torch.Generator().manual_seed(0)
    vocab, mask_id = 28, 27
    process = MaskedProcess(get_schedule("linear"), vocab, mask_id)
    x1 = torch.randint(0, 27, (4, 16), generator=g)
    t = torch.rand(4, generator=g)
    x_t = process.sample(x1, t, generator=g)
    logits = torch.randn(4, 16, vocab, generator=g)
    weight = process.loss_weight(x_t, t)
    for divergence in ("kl", "is", "gkl"):
        loss = reference.tcsm_loss(logits, x1, divergence=divergence, weight=weight, mask_id=mask_id)
        print(f"data-target {divergence:>3} loss: {loss.item():.4f}")
    step = reference.ctmc_step(logits, x_t, torch.tensor(0.5), mask_id=mask_id, seed=1)
    print("masked before:", int((x_t == mask_id).sum()), "after one step:", int((step == mask_id).sum()))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tcsm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the demo").set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)
