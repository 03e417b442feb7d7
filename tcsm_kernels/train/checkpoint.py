"""Checkpoints written atomically, verified on load, the previous one always kept.

File layout: an 8-byte magic, the SHA-256 of the payload, then the payload (``torch.save`` of a
dict of tensors and plain values, loaded back with ``weights_only=True``). A save goes to a
temporary file, is flushed to disk, and only then renamed over ``last.pt``; the file it replaces
becomes ``previous.pt``. A truncated or corrupt file fails the checksum with a clear error.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch

from .files import atomic_file

MAGIC = b"TCSMCKP1"
LAST = "last.pt"
PREVIOUS = "previous.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or corrupt."""


def save(directory: Path, state: dict) -> Path:
    """Write ``state`` as ``directory/last.pt``; the former last.pt becomes previous.pt."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    last = directory / LAST
    with atomic_file(last, "wb") as out:
        out.write(MAGIC + hashlib.sha256(payload).digest() + payload)
        out.flush()
        os.fsync(out.fileno())  # the new file is on disk before the old one is rotated out
        if last.exists() and _is_valid(last):  # never rotate a damaged file over a good one
            os.replace(last, directory / PREVIOUS)
    return directory / LAST


def _read_payload(path: Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    header = len(MAGIC) + 32
    if len(data) < header or data[:len(MAGIC)] != MAGIC:
        raise CheckpointError(f"checkpoint {path} is not a tcsm checkpoint or is truncated")
    payload = data[header:]
    if hashlib.sha256(payload).digest() != data[len(MAGIC):header]:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated (checksum mismatch)")
    return payload


def _is_valid(path: Path) -> bool:
    try:
        _read_payload(path)
    except CheckpointError:
        return False
    return True


def load(path: Path, map_location="cpu") -> dict:
    """The state dict saved in ``path``; CheckpointError if it is missing or damaged, naming the
    previous checkpoint when that one is intact."""
    path = Path(path)
    try:
        payload = _read_payload(path)
    except CheckpointError as err:
        previous = path.parent / PREVIOUS
        if path.name == LAST and _is_valid(previous):
            raise CheckpointError(f"{err}; the previous checkpoint {previous} is intact: resume "
                                  f"from it with --resume {previous}") from None
        raise
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
