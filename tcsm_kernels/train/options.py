"""Command-line options shared by the `tcsm` subcommands: every ``TrainConfig`` field as an
option, the per-invocation session options, and turning parsed arguments back into a
configuration, a ``Session`` and a printed summary."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable, Optional

from ..schedules import SCHEDULES
from .data import VOCABULARIES
from .run import (DIVERGENCES, DTYPES, PROCESSES, TIME_WEIGHTS, ConfigError, TrainConfig,
                  read_config)
from .trainer import Session, extend_run

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
    ("fused_head", argparse.BooleanOptionalAction, None,
     "loss from the hidden states and the tied head, no (N, V) logits (--no-fused-head: "
     "logits, then fused_tcsm_loss)"),
    ("vocab_parallel", argparse.BooleanOptionalAction, None,
     "split the LM head over the vocabulary across all ranks (tensor parallel; needs "
     "--fused-head); every rank sees the whole batch"),
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Subcommand help with each option's default, where there is one to say (not None, False
    or empty) and the help text does not say it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == "" \
                or "default" in text:
            return text
        return super()._get_help_string(action)


def add_command(subparsers, name: str, func: Callable[[argparse.Namespace], int],
                help_text: str, description: Optional[str] = None,
                **parser_options) -> argparse.ArgumentParser:
    """A `tcsm` subcommand that runs ``func(args)``; ``args.command_parser`` is its parser (for
    errors in its own words)."""
    parser = subparsers.add_parser(name, help=help_text, description=description or help_text,
                                   formatter_class=HelpFormatter, **parser_options)
    parser.set_defaults(func=func, command_parser=parser)
    return parser


def option_flag(name: str) -> str:
    """The command-line flag of a TrainConfig field: seq_len -> --seq-len."""
    return "--" + name.replace("_", "-")


def positive(kind: Callable) -> Callable[[str], object]:
    """An argparse type: ``kind(text)``, refused unless > 0."""
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """--out, --resume, every TrainConfig option (unset unless given) and the session options of
    `tcsm train`, which the commands that train a run share."""
    parser.add_argument("--out", required=True, help="run directory (new, or the one to resume)")
    parser.add_argument("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
                        help="continue the run in --out from its last checkpoint (or this file)")
    for name, kind, choices, text in CONFIG_OPTIONS:
        default = getattr(DEFAULTS, name)
        if default is not None:
            text = f"{text} (default: {default})"
        if kind is argparse.BooleanOptionalAction:
            parser.add_argument(option_flag(name), action=kind, default=argparse.SUPPRESS,
                                help=text)
        else:
            parser.add_argument(option_flag(name), type=kind, choices=choices,
                                default=argparse.SUPPRESS, help=text)
    session = parser.add_argument_group("this invocation only (may change on --resume)")
    session.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    session.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    session.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                         help="stop with a checkpoint after this step (resume later)")
    session.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                         help="stop with a checkpoint after this many seconds of this invocation")
    session.add_argument("--log-every", type=int, default=10, help="steps between log flushes")
    session.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> dict:
    """The TrainConfig fields given on the command line."""
    return {name: getattr(args, name) for name, *_ in CONFIG_OPTIONS if hasattr(args, name)}


def run_config(args: argparse.Namespace) -> Optional[TrainConfig]:
    """TrainConfig of a new run from the options given; None when resuming: the run keeps its
    saved configuration, so a given option must equal the saved value, except a larger
    --steps, which extends the run first (``trainer.extend_run``)."""
    given = config_from_args(args)
    if args.resume is None:
        return TrainConfig(**given)
    run_dir = Path(args.out)
    saved = read_config(run_dir)
    changed = [f"{option_flag(k)} {v} (run: {getattr(saved, k)})"
               for k, v in given.items() if k != "steps" and getattr(saved, k) != v]
    if changed:
        raise ConfigError("a resumed run keeps its configuration (only --steps may be "
                          "raised); these options differ: " + ", ".join(changed))
    if "steps" in given:
        extend_run(run_dir, given["steps"])
    return None


def session_from_args(args: argparse.Namespace) -> Session:
    """The Session of the options added by ``add_train_options``."""
    if args.log_every <= 0:
        raise ConfigError(f"--log-every must be > 0; got {args.log_every}")
    if args.stop_after is not None and args.stop_after <= 0:
        raise ConfigError(f"--stop-after must be > 0; got {args.stop_after}")
    return Session(out=args.out, resume=args.resume, device=args.device, threads=args.threads,
                   stop_after=args.stop_after, time_limit=args.time_limit,
                   log_every=args.log_every, quiet=args.quiet)


def print_summary(summary: dict) -> None:
    """One line on a finished (or stopped) training invocation; rank 0 only."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    position = f"step {summary['step']}/{summary['steps']}"
    loss = f"{summary['loss_label']} {summary['loss']:.4f}"
    if summary["trained_steps"] == 0 and not summary["stopped_early"]:
        print(f"nothing to train: the run is finished at {position} ({loss}); resume with a "
              f"larger --steps to extend it")
        return
    status = "stopped early" if summary["stopped_early"] else "done"
    print(f"{status}: {position}, {loss}, {summary['tokens_per_s'] / 1e3:.1f}k tokens/s, "
          f"{summary['elapsed_s']:.0f} s")
