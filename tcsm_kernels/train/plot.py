"""PNG curves of a run: training loss and validation bits per token against the step."""
from __future__ import annotations

from pathlib import Path

from .data import TokenCorpus, entropies
from .progress import read_metrics
from .report import pyplot, save_figure
from .run import METRICS_FILE, read_config


def plot_run(run_dir: Path, output: Path) -> Path:
    """Draw ``run_dir``'s metrics into ``output`` (PNG); returns the path written."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    records = read_metrics(run_dir / METRICS_FILE)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_bits" in r]
    if not train:
        raise ValueError(f"{run_dir / METRICS_FILE} holds no training records yet")
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in train]
    losses = [r["loss"] for r in train]
    window = max(len(losses) // 50, 1)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    left.plot(steps, losses, alpha=0.3, label="per step")
    left.plot(steps, smooth, label=f"mean of {window}")
    left.set(xlabel="step", ylabel="nats",
             title=f"training loss ({config.divergence}, {config.time_weight} weighting)")
    left.legend()
    corpus = TokenCorpus(run_dir, config.val_fraction)
    unigram, bigram = entropies(corpus.val, corpus.vocab.size)
    if val:
        right.plot([r["step"] for r in val], [r["val_bits"] for r in val], "o-", label="NELBO")
    right.axhline(unigram, color="gray", linestyle=":", label=f"unigram entropy {unigram:.2f}")
    right.axhline(bigram, color="black", linestyle="--", label=f"bigram entropy {bigram:.2f}")
    right.set(xlabel="step", ylabel="bits per token", title="validation")
    right.legend()
    fig.tight_layout()
    return save_figure(fig, output)
