"""Post-training subcommands of `tcsm`: AR teacher, distillation, reward fine-tuning, reports.

  tcsm train-ar --out runs/ar [train options]            causal teacher, same data and options
  tcsm distill --teacher runs/ar --out runs/d [--k 8 --taylor]   masked student from the teacher
  tcsm compare-distill --out runs/cmp                    data-only vs distillation (table + PNG)
  tcsm finetune --ref runs/a --reward vowels --beta 1 --out runs/f   reward tilt
  tcsm sweep-beta --out runs/sweep [--ref runs/a]        reward vs divergence over beta
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from .ar_teacher import train_teacher
from .beta_sweep import sweep_beta
from .distill import DistillOptions, compare_distill, distill
from .finetune import FinetuneOptions, finetune
from .options import (DEFAULTS, add_train_options, config_from_args, positive, print_summary,
                      run_config, session_from_args)
from .rewards import REWARDS
from .run import ConfigError
from .topk_target import TAILS
from .trainer import Session, train

# Budgets of the report commands: minutes on a 2-core CPU.
REPORT_CONFIG = replace(DEFAULTS, seq_len=32, d_model=64, n_layers=2, n_heads=4, batch_size=32,
                        steps=300, warmup=20, eval_every=50, eval_sequences=128, eval_times=4,
                        ckpt_every=0)


def _train_ar(args) -> int:
    print_summary(train_teacher(run_config(args), session_from_args(args)))
    return 0


def _distill_options(args):
    return DistillOptions(args.teacher, args.k, args.temperature, args.taylor, args.tail)


def _distill(args) -> int:
    if args.resume is None and args.teacher is None:
        raise ConfigError("--teacher is required for a new distillation run")
    options = None if args.resume is not None else _distill_options(args)
    print_summary(distill(run_config(args), session_from_args(args), options))
    return 0


def _compare_distill(args) -> int:
    given = config_from_args(args)
    config = replace(REPORT_CONFIG, **given)
    if config.eval_every <= 0:
        raise ConfigError("--eval-every must be > 0 for the comparison")
    table = compare_distill(args.out, config=config, teacher_steps=args.teacher_steps, k=args.k,
                            temperature=args.temperature, taylor=args.taylor,
                            threads=args.threads, quiet=args.quiet)
    print(table)
    print(f"wrote {Path(args.out) / 'comparison.md'} and {Path(args.out) / 'comparison.png'}")
    return 0


def _finetune(args) -> int:
    options = FinetuneOptions(args.ref, args.reward, args.beta, args.k, args.tail,
                              args.reward_steps)
    summary = finetune(options, Session(out=args.out, device=args.device, threads=args.threads,
                                        quiet=args.quiet),
                       steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    print_summary(summary)
    return 0


def _sweep_beta(args) -> int:
    if not all(beta > 0 for beta in args.betas):
        raise ConfigError(f"--betas must all be > 0; got {args.betas}")
    reference = args.ref
    if reference is None:
        reference = str(Path(args.out) / "reference")
        train(replace(REPORT_CONFIG, steps=args.ref_steps, eval_every=0),
              Session(out=reference, threads=args.threads, quiet=args.quiet, device="cpu"))
    table = sweep_beta(args.out, reference=reference, reward=args.reward, betas=args.betas,
                       steps=args.steps, lr=args.lr, k=args.k, reward_steps=args.reward_steps,
                       samples=args.samples, threads=args.threads, quiet=args.quiet)
    print(table)
    print(f"wrote {Path(args.out) / 'beta_sweep.md'} and {Path(args.out) / 'beta_sweep.png'}")
    return 0


def _add_teacher_options(parser, teacher_required: bool) -> None:
    if teacher_required:
        parser.add_argument("--teacher", default=None, metavar="RUN_OR_CKPT",
                            help="`tcsm train-ar` run directory or checkpoint (new runs)")
    parser.add_argument("--k", type=positive(int), default=8, help="top-K teacher candidates")
    parser.add_argument("--temperature", type=positive(float), default=1.0,
                        help="teacher temperature tau")
    parser.add_argument("--taylor", action="store_true",
                        help="add the first-order future term (E_y - E_x) . g_i")
    parser.add_argument("--tail", choices=TAILS, default="zero",
                        help="zero: non-candidates have target ratio 0; ignore: not counted")


def _add_finetune_options(parser) -> None:
    parser.add_argument("--reward", choices=REWARDS, default="vowels",
                        help="vowels: count of vowels (exact neighbour rewards); classifier: "
                             "log-odds of a corpus-half classifier (Taylor neighbour rewards)")
    parser.add_argument("--steps", type=positive(int), default=150)
    parser.add_argument("--lr", type=positive(float), default=1e-3)
    parser.add_argument("--k", type=positive(int), default=8,
                        help="candidates: top-K of the reference at each position")
    parser.add_argument("--tail", choices=TAILS, default="zero")
    parser.add_argument("--reward-steps", type=positive(int), default=200,
                        help="training steps of the classifier reward")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quiet", action="store_true")


def add_post_training_commands(subparsers) -> None:
    """Add train-ar, distill, compare-distill, finetune and sweep-beta to `tcsm`'s
    subparsers."""
    train_options = argparse.ArgumentParser(add_help=False)
    add_train_options(train_options)

    p = subparsers.add_parser("train-ar", parents=[train_options], add_help=False,
                              help="train a causal (autoregressive) teacher",
                              description="Train a causal transformer teacher with the "
                                          "options and conventions of `tcsm train`.")
    p.set_defaults(func=_train_ar)

    p = subparsers.add_parser("distill", parents=[train_options], add_help=False,
                              help="distil an AR teacher into a masked-diffusion student",
                              description="Masked-diffusion student trained with "
                                          "fused_tcsm_loss on the teacher's top-K concrete "
                                          "scores (SPEC 6).")
    _add_teacher_options(p, teacher_required=True)
    p.set_defaults(func=_distill)

    p = subparsers.add_parser("compare-distill", parents=[train_options], add_help=False,
                              help="data-only pre-training vs distillation (table + PNG)",
                              description="Train an AR teacher, a data-only student and a "
                                          "distilled student with small budgets; write "
                                          "comparison.md and comparison.png into --out.")
    p.add_argument("--teacher-steps", type=positive(int), default=400)
    _add_teacher_options(p, teacher_required=False)
    p.set_defaults(func=_compare_distill)

    p = subparsers.add_parser("finetune", help="reward fine-tuning toward p_ref exp(r / beta)",
                              description="Fine-tune a masked-diffusion run (--ref) toward "
                                          "p*(x) ∝ p_ref(x) exp(r(x) / beta).")
    p.add_argument("--ref", required=True, help="reference run directory (tcsm train/distill)")
    p.add_argument("--beta", type=float, required=True, help="reward temperature (> 0)")
    p.add_argument("--out", required=True, help="new run directory")
    p.add_argument("--batch-size", type=positive(int), default=None,
                   help="default: the reference's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    _add_finetune_options(p)
    p.set_defaults(func=_finetune)

    p = subparsers.add_parser("sweep-beta", help="reward vs divergence over beta (table + PNG)",
                              description="Fine-tune for several beta with small budgets; "
                                          "write beta_sweep.md and beta_sweep.png into --out.")
    p.add_argument("--out", required=True)
    p.add_argument("--ref", default=None,
                   help="reference run (default: pre-train one in OUT/reference)")
    p.add_argument("--ref-steps", type=positive(int), default=600,
                   help="steps of the reference pre-trained when --ref is not given")
    p.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0])
    p.add_argument("--samples", type=positive(int), default=64)
    _add_finetune_options(p)
    p.set_defaults(func=_sweep_beta)
