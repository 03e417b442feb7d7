"""Progress of long work: a one-line progress bar, and a run's metrics JSONL file."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .files import write_text_atomic


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    """``step 120/400 [#####.....] loss 2.314  41.2k tok/s  ETA 0:00:45`` on stderr (``label``
    ``done/total``, the bar, a caller's detail, the time left); redrawn in place on a terminal,
    otherwise a new line at most every ``interval`` seconds (and at the end). Silent when
    ``enabled`` is false."""

    def __init__(self, total: int, first: int, enabled: bool, label: str = "step",
                 width: int = 20, interval: float = 10.0):
        self.total = total
        self.first = first
        self.enabled = enabled
        self.label = label
        self.width = width
        self.interval = interval
        self.started = self.last_line = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, done: int, detail: str = "") -> None:
        now = time.perf_counter()
        if not self.enabled or not (self.tty or done == self.total
                                    or now - self.last_line >= self.interval):
            return
        self.last_line = now
        per_item = (now - self.started) / max(done - self.first, 1)
        bar = "#" * int(done / max(self.total, 1) * self.width)
        eta = format_seconds(per_item * (self.total - done))
        line = f"{self.label} {done}/{self.total} [{bar:.<{self.width}}] "
        line += f"{detail}  ETA {eta}" if detail else f"ETA {eta}"
        sys.stderr.write(("\r" + line) if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


class MetricsLog:
    """Appends one JSON object per line to a run's metrics file."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, records) -> None:
        if not self.enabled or not records:
            return
        with open(self.path, "a") as out:
            out.writelines(json.dumps(record) + "\n" for record in records)

    def last(self, field: str, default: float = float("nan")) -> float:
        """The last value of ``field`` written (``default`` if none, or when disabled)."""
        if not self.enabled or not self.path.exists():
            return default
        values = [r[field] for r in read_metrics(self.path) if field in r]
        return values[-1] if values else default

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint a resumed run starts from)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in keep))


def read_metrics(path: Path) -> list:
    """All records of a metrics file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
