"""Training progress: a one-line progress bar and the metrics JSONL file."""
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
    """``step 120/400 [#####.....] loss 2.314  41.2k tok/s  ETA 0:00:45`` on stderr; redrawn in
    place on a terminal, otherwise a new line at most every ``interval`` seconds (and at the
    last step). Silent when ``enabled`` is false."""

    def __init__(self, total_steps: int, first_step: int, enabled: bool, width: int = 20,
                 interval: float = 10.0):
        self.total = total_steps
        self.first = first_step
        self.enabled = enabled
        self.width = width
        self.interval = interval
        self.started = self.last_line = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        now = time.perf_counter()
        if not self.enabled or not (self.tty or step == self.total
                                    or now - self.last_line >= self.interval):
            return
        self.last_line = now
        done = step / self.total
        per_step = (now - self.started) / max(step - self.first, 1)
        bar = "#" * int(done * self.width)
        eta = format_seconds(per_step * (self.total - step))
        line = (f"step {step}/{self.total} [{bar:.<{self.width}}] loss {loss:.4f}  "
                f"{tokens_per_s / 1e3:.1f}k tok/s  ETA {eta}")
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
