"""PNG curves of a run: training loss and validation bits per token against the step."""
from __future__ import annotations

from pathlib import Path
from typing import List

from .data import TokenCorpus, entropies
from .progress import read_metrics
from .report import pyplot, save_figure
from .run import METRICS_FILE, read_config, read_loss_info

DIVERGENCE_NAMES = {"kl": "KL (cross-entropy)", "is": "IS", "gkl": "generalized KL"}
SMOOTHING_POINTS = 50  # the moving mean spans about 1/50 of the run


def moving_mean(values: List[float], window: int) -> List[float]:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_run(run_dir: Path, output: Path) -> Path:
    """Draw ``run_dir``'s metrics into ``output`` (PNG); returns the path written."""
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    loss = read_loss_info(run_dir, config)
    records = read_metrics(run_dir / METRICS_FILE)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_bits" in r]
    if not train:
        raise ValueError(f"{run_dir / METRICS_FILE} holds no training records yet")
    steps = [r["step"] for r in train]
    losses = [r["loss"] for r in train]

    fig, (left, right) = pyplot().subplots(1, 2, figsize=(12, 4.8), sharex=True)
    fig.suptitle(f"{run_dir.name}: {config.process} diffusion, step {steps[-1]} of "
                 f"{config.steps}", fontweight="bold")
    window = max(len(losses) // SMOOTHING_POINTS, 1)
    left.plot(steps, losses, color="tab:blue", alpha=0.3 if window > 1 else 1.0, linewidth=1,
              label="per step")
    if window > 1:
        left.plot(steps, moving_mean(losses, window), color="tab:blue",
                  label=f"moving mean over {window} steps")
    left.set(xlabel="training step", ylabel=f"{loss.label}, nats",
             title=f"training loss: {DIVERGENCE_NAMES.get(loss.divergence, loss.divergence)} "
                   f"on the {loss.target} target\n{loss.weighting}")
    if loss.estimate:
        left.axhline(0, color="gray", linewidth=0.8)
        left.text(0.02, 0.03, "a Monte-Carlo estimate with its constant dropped:\n"
                  "it can be negative; its gradient is unbiased",
                  transform=left.transAxes, fontsize=8, color="dimgray")
    left.legend(loc="upper right", fontsize=9)

    corpus = TokenCorpus(run_dir, config.val_fraction)
    unigram, bigram = entropies(corpus.val, corpus.vocab.size)
    if val:
        val_steps, bits = [r["step"] for r in val], [r["val_bits"] for r in val]
        right.plot(val_steps, bits, "o-", color="tab:red", markersize=6,
                   label="validation NELBO (a bound on bits per token)")
        right.annotate(f"{bits[-1]:.2f}", (val_steps[-1], bits[-1]), textcoords="offset points",
                       xytext=(-8, 8), ha="right", color="tab:red")
    else:
        right.text(0.5, 0.5, "no validation records (--eval-every 0);\n"
                   "`tcsm eval` measures the final model", transform=right.transAxes,
                   ha="center", va="center", color="dimgray")
    right.axhline(unigram, color="gray", linestyle=":",
                  label=f"unigram entropy H(x_i), {unigram:.2f}")
    right.axhline(bigram, color="black", linestyle="--",
                  label=f"bigram entropy H(x_i | x_i-1), {bigram:.2f}")
    right.set(xlabel="training step", ylabel="bits per token",
              title="validation NELBO beside the validation text's entropies\n(below the "
                    "bigram line: better than any bigram model)")
    right.legend(loc="best", fontsize=9)
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    left.set_xlim(0, max(steps[-1], 1) * 1.03)  # room for the last marker
    fig.tight_layout()
    return save_figure(fig, output)
