"""Reports written into run directories: markdown tables and PNG figures (both atomically)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .files import atomic_file, write_text_atomic


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table of ``rows`` under ``header``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """The markdown table of ``rows`` under ``header``, written to ``path`` and returned."""
    text = markdown_table(header, rows)
    write_text_atomic(Path(path), text)
    return text


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(figure, path: Path, dpi: int = 100) -> Path:
    """Write ``figure`` as a PNG to ``path`` and close it; returns the path."""
    path = Path(path)
    with atomic_file(path, "wb") as out:
        figure.savefig(out, format="png", dpi=dpi)
    pyplot().close(figure)
    return path
