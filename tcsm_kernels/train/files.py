"""Files written atomically: a temporary file in the target's directory, flushed to disk, then
renamed over the target, so a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """An open temporary file that replaces ``path`` when the block ends without an error (on
    an error it is removed and ``path`` is left as it was)."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, mode) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as out:
        out.write(text)


def write_json_atomic(path: Path, data) -> None:
    with atomic_file(path) as out:
        json.dump(data, out, indent=1)
