"""The `tcsm` command: train, eval, sample, plot, demo.

  tcsm demo                                  the tour (a few minutes on CPU)
  tcsm train --out runs/a [--steps 2000 ...] pre-train (torchrun ... -m tcsm_kernels train: DDP)
  tcsm train --out runs/a --resume           continue from the last checkpoint
  tcsm eval --run runs/a                     validation NELBO beside n-gram entropies
  tcsm sample --run runs/a --method exact    generate text
  tcsm plot --run runs/a                     loss and validation curves (PNG)
  tcsm train-ar / distill / compare-distill  AR teacher and top-K distillation (SPEC 6)
  tcsm finetune / sweep-beta                 reward fine-tuning against a frozen reference
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..schedules import SCHEDULES
from .checkpoint import CheckpointError
from .data import VOCABULARIES, DataError
from .run import DIVERGENCES, DTYPES, PROCESSES, TIME_WEIGHTS, ConfigError, TrainConfig
from .sample import METHODS

DEFAULTS = TrainConfig()

# (option, type or action, choices, help) for every TrainConfig field
CONFIG_OPTIONS = [
    ("data", str, None, "UTF-8 text file (e.g. text8); default: the embedded pydoc corpus"),
    ("vocab", str, VOCABULARIES, "text8: a-z and space; char: every character; byte: 256 bytes"),
    ("val_fraction", float, None, "final fraction of the corpus held out for validation"),
    ("process", str, PROCESSES, "forward noising process"),
    ("schedule", str, tuple(SCHEDULES), "kappa(t) schedule"),
    ("divergence", str, DIVERGENCES, "TCSM divergence of the data-target loss"),
    ("time_weight", str, TIME_WEIGHTS,
     "elbo: weight w(t) per loss position, / all positions; none: mean over loss positions"),
    ("seq_len", int, None, "sequence length"),
    ("d_model", int, None, "transformer width"),
    ("n_layers", int, None, "transformer blocks"),
    ("n_heads", int, None, "attention heads"),
    ("time_conditioning", argparse.BooleanOptionalAction, None,
     "feed t to the model (default: only for the uniform process)"),
    ("batch_size", int, None, "global batch (sequences per optimizer step, all ranks)"),
    ("grad_accum", int, None, "micro-batches per optimizer step"),
    ("steps", int, None, "optimizer steps"),
    ("lr", float, None, "peak learning rate (AdamW)"),
    ("warmup", int, None, "linear warm-up steps before the cosine decay"),
    ("min_lr_ratio", float, None, "final learning rate / peak"),
    ("weight_decay", float, None, "AdamW weight decay on matrices"),
    ("grad_clip", float, None, "gradient norm clip (0: off)"),
    ("seed", int, None, "seed of the initialisation and of every batch"),
    ("dtype", str, DTYPES, "auto: bfloat16 autocast on GPU, float32 on CPU"),
    ("eval_every", int, None, "steps between validation NELBO records (0: none)"),
    ("eval_sequences", int, None, "validation sequences per record during training"),
    ("eval_times", int, None, "time samples per sequence during training"),
    ("ckpt_every", int, None, "steps between checkpoints (always one at the end)"),
]


def _add_train_parser(sub) -> None:
    parser = sub.add_parser("train", help="pre-train a diffusion LM",
                            description="Pre-train a small diffusion LM with fused_tcsm_loss.")
    parser.add_argument("--out", required=True, help="run directory (new, or the one to resume)")
    parser.add_argument("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
                        help="continue the run in --out from its last checkpoint (or this file)")
    for name, kind, choices, text in CONFIG_OPTIONS:
        flag = "--" + name.replace("_", "-")
        default = getattr(DEFAULTS, name)
        if default is not None:
            text = f"{text} (default: {default})"
        if kind is argparse.BooleanOptionalAction:
            parser.add_argument(flag, action=kind, default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(flag, type=kind, choices=choices, default=argparse.SUPPRESS,
                                help=text)
    session = parser.add_argument_group("this invocation only (may change on --resume)")
    session.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    session.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    session.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                         help="stop with a checkpoint after this step (resume later)")
    session.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                         help="stop with a checkpoint after this many seconds of this invocation")
    session.add_argument("--log-every", type=int, default=10, help="steps between log flushes")
    session.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_train)


def _config_from_args(args) -> dict:
    return {name: getattr(args, name) for name, *_ in CONFIG_OPTIONS if hasattr(args, name)}


def _train(args) -> int:
    from .pretrain import Session, train
    from .run import read_config

    given = _config_from_args(args)
    if args.log_every <= 0:
        raise ConfigError(f"--log-every must be > 0; got {args.log_every}")
    if args.stop_after is not None and args.stop_after <= 0:
        raise ConfigError(f"--stop-after must be > 0; got {args.stop_after}")
    config = None
    if args.resume is None:
        config = TrainConfig(**given)
    else:
        saved = read_config(Path(args.out))
        changed = [f"--{k.replace('_', '-')} {v} (run: {getattr(saved, k)})"
                   for k, v in given.items() if getattr(saved, k) != v]
        if changed:
            raise ConfigError("a resumed run keeps its configuration; these options differ: "
                              + ", ".join(changed))
    session = Session(out=args.out, resume=args.resume, device=args.device, threads=args.threads,
                      stop_after=args.stop_after, time_limit=args.time_limit,
                      log_every=args.log_every, quiet=args.quiet)
    summary = train(config, session)
    if int(os.environ.get("RANK", "0")) == 0:
        status = "stopped early" if summary["stopped_early"] else "done"
        print(f"{status}: step {summary['step']}/{summary['steps']}, loss {summary['loss']:.4f}, "
              f"{summary['tokens_per_s'] / 1e3:.1f}k tokens/s, {summary['elapsed_s']:.0f} s")
    return 0


def _eval(args) -> int:
    from .demo import format_evaluation
    from .evaluate import evaluate_run
    from .run import load_trained

    result = evaluate_run(load_trained(args.run, args.checkpoint, args.device),
                          time_samples=args.time_samples, max_sequences=args.max_sequences,
                          seed=args.seed)
    print(json.dumps(result) if args.json else f"step {result['step']}\n"
          + format_evaluation(result))
    return 0


def _sample(args) -> int:
    from .run import load_trained
    from .sample import generate

    trained = load_trained(args.run, args.checkpoint, args.device)
    for text in generate(trained, method=args.method, steps=args.steps, num=args.num,
                         temperature=args.temperature, seed=args.seed, prompt=args.prompt):
        print(text)
    return 0


def _plot(args) -> int:
    from .plot import plot_run

    output = args.output or str(Path(args.run) / "curves.png")
    print(plot_run(Path(args.run), Path(output)))
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, train_seconds=args.train_seconds, bench=not args.no_bench,
             threads=args.threads)
    return 0


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tcsm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)

    def run_parser(name, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--run", required=True, help="run directory written by `tcsm train`")
        p.add_argument("--checkpoint", default=None, help="checkpoint file (default: the last)")
        p.add_argument("--device", default="auto")
        return p

    p = run_parser("eval", "validation NELBO (bits per token) beside n-gram entropies")
    p.add_argument("--time-samples", type=_positive(int), default=8,
                   help="stratified times per sequence")
    p.add_argument("--max-sequences", type=int, default=0, help="0: the whole validation split")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_eval)

    p = run_parser("sample", "generate text from a trained run")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="exact, euler, confidence (masked runs; default exact) or uniform")
    p.add_argument("--steps", type=_positive(int), default=32)
    p.add_argument("--num", type=_positive(int), default=4, help="sequences")
    p.add_argument("--temperature", type=_positive(float), default=1.0)
    p.add_argument("--prompt", default="", help="fixed text at the start (masked runs)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_sample)

    p = sub.add_parser("plot", help="PNG of the training loss and validation curves")
    p.add_argument("--run", required=True)
    p.add_argument("--output", default=None, help="PNG path (default: RUN/curves.png)")
    p.set_defaults(func=_plot)

    p = sub.add_parser("demo", help="train, evaluate and sample in a few minutes on CPU")
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary "
                   "directory, removed at the end)")
    p.add_argument("--train-seconds", type=_positive(float), default=140.0,
                   help="training time the step count is calibrated for")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-bench", action="store_true", help="skip the fused-vs-reference table")
    p.set_defaults(func=_demo)

    from .post_cli import add_post_training_commands  # imported here: it reuses this module
    add_post_training_commands(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, ValueError, OSError) as err:
        print(f"tcsm {args.command}: error: {err}", file=sys.stderr)
        return 2
