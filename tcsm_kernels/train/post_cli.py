"""Post-training subcommands of `tcsm`: AR teacher, distillation, reward fine-tuning, reports.

  tcsm train-ar --out runs/ar [train options]            causal teacher, same data and options
  tcsm distill-targets --teacher runs/ar --out runs/t    exact full-context targets (cached)
  tcsm distill --teacher runs/ar --targets runs/t --out runs/d   masked student from the teacher
  tcsm compare-distill --out runs/cmp                    matched arms x seeds (JSON, table, PNG)
  tcsm finetune --ref runs/a --reward vowels --beta 1 --out runs/f   reward tilt
  tcsm sweep-beta --out runs/sweep [--ref runs/a]        reward vs divergence over beta
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from .ar_teacher import train_teacher
from .beta_sweep import sweep_beta
from .distill import TARGET_KINDS, DistillOptions, distill
from .distill_report import ARMS, compare_distill
from .finetune import FinetuneOptions, finetune
from .options import (DEFAULTS, add_command, add_train_options, config_from_args, positive,
                      print_summary, run_config, session_from_args)
from .rewards import REWARDS
from .run import ConfigError
from .targets import KINDS, distill_targets
from .topk_target import OBJECTIVES, TAILS
from .trainer import Session, train

# Budgets of the report commands: minutes on a 2-core CPU.
REPORT_CONFIG = replace(DEFAULTS, seq_len=32, d_model=64, n_layers=2, n_heads=4, batch_size=32,
                        steps=300, warmup=20, eval_every=50, eval_sequences=128, eval_times=4,
                        ckpt_every=0)


def _train_ar(args) -> int:
    print_summary(train_teacher(run_config(args), session_from_args(args)))
    return 0


def _distill_options(args):
    return DistillOptions(args.teacher, args.targets, args.target, args.k, args.temperature,
                          args.objective, args.tail)


def _distill_targets(args) -> int:
    store, taylor = distill_targets(args.teacher, args.out, kind=args.kind,
                                    windows=args.windows, k=args.k, candidates=args.candidates,
                                    chunk=args.chunk, check_taylor=args.check_taylor,
                                    progress=not args.quiet)
    meta = store.meta
    print(f"targets: {meta.windows} windows x {meta.seq_len} positions, top {meta.k} of "
          f"{meta.candidates} candidates, built in {meta.build_seconds:.0f} s "
          f"({1000 * meta.build_seconds / meta.windows:.0f} ms per window) -> {store.path}")
    if taylor is not None:
        print(f"Taylor future term vs the exact one on {taylor['pairs']} (position, symbol) "
              f"pairs: correlation {taylor['correlation']:.3f}, sign agreement "
              f"{taylor['sign_agreement']:.1%}, largest |Taylor term| "
              f"{taylor['max_abs_taylor_nats']:.1f} nats")
    return 0


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
    table = compare_distill(args.out, config=config, teacher_steps=args.teacher_steps,
                            teacher=args.teacher, k=args.k, windows=args.windows,
                            seeds=args.seeds, arms=args.arms, threads=args.threads,
                            quiet=args.quiet, json_path=args.json)
    print(table)
    out = Path(args.out)
    print(f"wrote {args.json or out / 'distill_comparison.json'}, {out / 'comparison.md'} and "
          f"{out / 'comparison.png'}")
    return 0


def _finetune(args) -> int:
    options = FinetuneOptions(args.ref, args.reward, args.beta, args.k, args.tail,
                              args.reward_steps, args.objective)
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


def _add_teacher_options(parser) -> None:
    parser.add_argument("--teacher", default=None, metavar="RUN_OR_CKPT",
                        help="`tcsm train-ar` run directory or checkpoint (new runs)")
    parser.add_argument("--targets", default=None, metavar="STORE",
                        help="cached exact targets of `tcsm distill-targets` (also the window "
                             "pool the batches come from)")
    parser.add_argument("--target", choices=TARGET_KINDS, default="exact",
                        help="exact: full-context conditional (needs --targets); local: "
                             "left context only; taylor: local + first-order future term")
    parser.add_argument("--k", type=int, default=8,
                        help="top-K teacher entries per position (0: the whole distribution)")
    parser.add_argument("--temperature", type=positive(float), default=1.0,
                        help="teacher temperature tau (local/taylor)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="distrib",
                        help="distrib: fit the teacher's distribution; score: log-ratios "
                             "against the data token (biased: docs/math.md 4.3)")
    parser.add_argument("--tail", choices=TAILS, default="zero",
                        help="mass off the top-K: zero (one rest cell) or renormalize "
                             "(distrib); zero or ignore (score)")


def _add_finetune_options(parser) -> None:
    parser.add_argument("--reward", choices=REWARDS, default="vowels",
                        help="vowels: count of vowels (exact neighbour rewards); classifier: "
                             "log-odds of a corpus-half classifier (Taylor neighbour rewards)")
    parser.add_argument("--steps", type=positive(int), default=150, help="fine-tuning steps")
    parser.add_argument("--lr", type=positive(float), default=1e-3, help="peak learning rate")
    parser.add_argument("--k", type=positive(int), default=8,
                        help="candidates: top-K of the reference at each position")
    parser.add_argument("--objective", choices=OBJECTIVES, default="distrib",
                        help="distrib: fit the tilted distribution; score: log-ratios against "
                             "the data token (biased: docs/math.md 4.3)")
    parser.add_argument("--tail", choices=TAILS, default="zero",
                        help="the reference's mass off the candidates: zero (one rest cell) "
                             "or renormalize (distrib); zero or ignore (score)")
    parser.add_argument("--reward-steps", type=positive(int), default=200,
                        help="training steps of the classifier reward")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_post_training_commands(subparsers) -> None:
    """Add train-ar, distill, compare-distill, finetune and sweep-beta to `tcsm`'s
    subparsers."""
    train_options = argparse.ArgumentParser(add_help=False)
    add_train_options(train_options)

    add_command(subparsers, "train-ar", _train_ar, "train a causal (autoregressive) teacher",
                "Train a causal transformer teacher with the options and conventions of "
                "`tcsm train`.", parents=[train_options])

    p = add_command(subparsers, "distill-targets", _distill_targets,
                    "cache a teacher's exact full-context targets",
                    "For a pool of training windows, the teacher's full-context conditional "
                    "p(y | x^{\\i}) at every position (docs/math.md 6), top-K per position, "
                    "written to a memory-mapped store; resumable, published atomically.")
    p.add_argument("--teacher", required=True, metavar="RUN",
                   help="`tcsm train-ar` run (--kind ar) or masked-diffusion run (denoiser)")
    p.add_argument("--out", required=True, metavar="STORE", help="store directory to write")
    p.add_argument("--kind", choices=KINDS, default="ar",
                   help="ar: exact future term by suffix passes; denoiser: one position masked")
    p.add_argument("--windows", type=positive(int), default=1024,
                   help="non-overlapping training windows in the pool")
    p.add_argument("--k", type=int, default=0, help="entries kept per position (0: all V)")
    p.add_argument("--candidates", type=int, default=0,
                   help="AR: candidates scored per position (0: all V; else the local top "
                        "plus the clean token)")
    p.add_argument("--chunk", type=positive(int), default=64,
                   help="windows per batch (and per durable commit)")
    p.add_argument("--check-taylor", action="store_true",
                   help="print how the Taylor future term agrees with the exact one")
    p.add_argument("--quiet", action="store_true", help="no progress lines")

    p = add_command(subparsers, "distill", _distill,
                    "distil an AR teacher into a masked-diffusion student",
                    "Masked-diffusion student trained with fused_tcsm_loss on the teacher's "
                    "target: by default its cached full-context distribution (--targets) with "
                    "the distribution objective (docs/math.md 4.5, 6).", parents=[train_options])
    _add_teacher_options(p)

    p = add_command(subparsers, "compare-distill", _compare_distill,
                    "matched data-only vs distillation arms over seeds (JSON, table, PNG)",
                    "Train an AR teacher (or use --teacher), cache its exact targets for a "
                    "window pool, and train the arms data, exact_dense, exact_topk, local and "
                    "taylor for each seed with the same configuration; write "
                    "distill_comparison.json, comparison.md and comparison.png into --out. "
                    "Finished runs are reused when run again.", parents=[train_options])
    p.add_argument("--teacher", default=None, metavar="RUN",
                   help="an existing `tcsm train-ar` run (default: train one in OUT/teacher)")
    p.add_argument("--teacher-steps", type=positive(int), default=400,
                   help="training steps of the AR teacher")
    p.add_argument("--k", type=positive(int), default=8, help="K of the exact_topk arm")
    p.add_argument("--windows", type=positive(int), default=1024,
                   help="training windows in the shared pool")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per arm")
    p.add_argument("--arms", choices=ARMS, nargs="+", default=list(ARMS), help="arms to run")
    p.add_argument("--json", default=None, help="where to write the JSON (default: OUT/...)")

    p = add_command(subparsers, "finetune", _finetune,
                    "reward fine-tuning toward p_ref exp(r / beta)",
                    "Fine-tune a masked-diffusion run (--ref) toward "
                    "p*(x) ∝ p_ref(x) exp(r(x) / beta).")
    p.add_argument("--ref", required=True, help="reference run directory (tcsm train/distill)")
    p.add_argument("--beta", type=float, required=True, help="reward temperature (> 0)")
    p.add_argument("--out", required=True, help="new run directory")
    p.add_argument("--batch-size", type=positive(int), default=None,
                   help="default: the reference's")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    _add_finetune_options(p)

    p = add_command(subparsers, "sweep-beta", _sweep_beta,
                    "reward vs divergence over beta (table + PNG)",
                    "Fine-tune for several beta with small budgets; write beta_sweep.md and "
                    "beta_sweep.png into --out.")
    p.add_argument("--out", required=True, help="directory of the sweep's runs and report")
    p.add_argument("--ref", default=None,
                   help="reference run (default: pre-train one in OUT/reference)")
    p.add_argument("--ref-steps", type=positive(int), default=600,
                   help="steps of the reference pre-trained when --ref is not given")
    p.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0],
                   help="reward temperatures")
    p.add_argument("--samples", type=positive(int), default=64,
                   help="samples scored per model")
    _add_finetune_options(p)
