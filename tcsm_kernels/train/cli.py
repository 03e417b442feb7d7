"""The `tcsm` command: train, eval, sample, plot, demo.

  tcsm demo                                  the tour (a few minutes on CPU)
  tcsm train --out runs/a [--steps 2000 ...] pre-train (torchrun ... -m tcsm_kernels train: DDP)
  tcsm train --out runs/a --resume           continue from the last checkpoint
  tcsm eval --run runs/a                     validation NELBO beside n-gram entropies
  tcsm sample --run runs/a --method exact    generate text
  tcsm plot --run runs/a                     loss and validation curves (PNG)
  tcsm train-ar / distill / compare-distill  AR teacher and top-K distillation (math.md 6)
  tcsm finetune / sweep-beta                 reward fine-tuning against a frozen reference
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .data import DataError
from .demo import run_demo
from .evaluate import evaluate_run, format_evaluation
from .options import (add_command, add_train_options, positive, print_summary, run_config,
                      session_from_args)
from .plot import plot_run
from .post_cli import add_post_training_commands
from .run import ConfigError, load_trained
from .sample import METHODS, generate
from .trainer import train


def _train(args) -> int:
    session = session_from_args(args)
    print_summary(train(run_config(args), session))
    return 0


def _eval(args) -> int:
    result = evaluate_run(load_trained(args.run, args.checkpoint, args.device),
                          time_samples=args.time_samples, max_sequences=args.max_sequences,
                          seed=args.seed, progress=not args.quiet)
    print(json.dumps(result) if args.json else f"step {result['step']}\n"
          + format_evaluation(result))
    return 0


def _sample(args) -> int:
    trained = load_trained(args.run, args.checkpoint, args.device)
    for text in generate(trained, method=args.method, steps=args.steps, num=args.num,
                         temperature=args.temperature, seed=args.seed, prompt=args.prompt,
                         report=lambda change: _warn(args, change), progress=not args.quiet):
        print(text)
    return 0


def _plot(args) -> int:
    output = args.output or str(Path(args.run) / "curves.png")
    print(plot_run(Path(args.run), Path(output)))
    return 0


def _demo(args) -> int:
    run_demo(out=args.out, train_seconds=args.train_seconds, bench=not args.no_bench,
             threads=args.threads)
    return 0


def _warn(args, message: str) -> None:
    print(f"tcsm {args.command}: warning: {message}", file=sys.stderr)


def _add_run_command(sub, name: str, func, help_text: str) -> argparse.ArgumentParser:
    """A subcommand that reads a trained run: --run, --checkpoint, --device, --quiet."""
    parser = add_command(sub, name, func, help_text)
    parser.add_argument("--run", required=True, help="run directory written by `tcsm train`")
    parser.add_argument("--checkpoint", default=None, help="checkpoint file (default: the last)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tcsm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = add_command(sub, "train", _train, "pre-train a diffusion LM",
                    "Pre-train a small diffusion LM with fused_tcsm_loss. --resume continues a "
                    "stopped run bit for bit; with a larger --steps it extends a run (the "
                    "cosine decay keeps its planned end, the extra steps train at the final "
                    "learning rate).")
    add_train_options(p)

    p = _add_run_command(sub, "eval", _eval,
                         "validation NELBO (bits per token) beside n-gram entropies")
    p.add_argument("--time-samples", type=positive(int), default=8,
                   help="stratified times per sequence")
    p.add_argument("--max-sequences", type=int, default=0, help="0: the whole validation split")
    p.add_argument("--seed", type=int, default=1234, help="seed of the times and masks")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = _add_run_command(sub, "sample", _sample, "generate text from a trained run")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="exact, euler, confidence (masked runs; default exact) or uniform")
    p.add_argument("--steps", type=positive(int), default=32, help="sampler steps")
    p.add_argument("--num", type=positive(int), default=4, help="sequences")
    p.add_argument("--temperature", type=positive(float), default=1.0,
                   help="softmax temperature of the model's logits")
    p.add_argument("--prompt", default="", help="fixed text at the start (masked runs); "
                   "cleaned to the run's vocabulary and cut to its length, with a warning")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")

    p = add_command(sub, "plot", _plot, "PNG of the training loss and validation curves",
                    "Draw a run's training loss (per step and its moving mean) and validation "
                    "NELBO (bits per token, beside the validation text's unigram and bigram "
                    "entropies) against the step into one PNG.")
    p.add_argument("--run", required=True, help="run directory written by `tcsm train`")
    p.add_argument("--output", default=None, help="PNG path (default: RUN/curves.png)")

    p = add_command(sub, "demo", _demo, "train, evaluate and sample in a few minutes on CPU")
    p.add_argument("--out", default=None, help="directory for the run (default: a new "
                   "runs/demo-<time>; kept, and printed at the end)")
    p.add_argument("--train-seconds", type=positive(float), default=140.0,
                   help="training time the step count is calibrated for")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-bench", action="store_true", help="skip the fused-vs-reference table")

    add_post_training_commands(sub)
    return parser


def main(argv=None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # the subcommand's usage, not the top level's
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, ValueError, OSError) as err:
        print(f"tcsm {args.command}: error: {err}", file=sys.stderr)
        return 2
