"""Corpora as memory-mapped token files, deterministic batches, and corpus entropies.

A corpus is tokenised once, streaming, into ``tokens.bin`` (uint8 or uint16, one id per
symbol) beside ``vocab.json``; training and evaluation read it through ``numpy.memmap``, so a
large file (the 100 MB text8) never has to fit in memory. The last ``val_fraction`` of the
tokens is the validation split, the rest the training split.

Vocabularies: ``text8`` (letters a-z, case folded, every other character a space, runs of spaces
collapsed: 27 symbols, the text8 cleaning), ``char`` (every distinct Unicode character of the
file) and ``byte`` (256 byte values). The masked process appends one mask token after them.
"""
from __future__ import annotations

import codecs
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from .files import atomic_file, write_json_atomic

TEXT8_SYMBOLS = " abcdefghijklmnopqrstuvwxyz"
VOCABULARIES = ("text8", "char", "byte")
TOKENS_FILE = "tokens.bin"
VOCAB_FILE = "vocab.json"
CHUNK_BYTES = 1 << 22


class DataError(ValueError):
    """A corpus that cannot be used: missing, unreadable, not UTF-8, or too small."""


@dataclass(frozen=True)
class Vocabulary:
    """Symbols of a tokenised corpus; ids are positions in ``symbols`` (bytes: the byte value)."""

    kind: str
    symbols: Tuple[str, ...]

    @property
    def size(self) -> int:
        """Number of data symbols (without a mask token)."""
        return 256 if self.kind == "byte" else len(self.symbols)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.size <= 256 else np.uint16)

    def encode(self, text: str) -> np.ndarray:
        """Token ids (n,) of a short text (a prompt), cleaned the way the corpus was."""
        ids = _encoder(self)(text.encode("utf-8"), True).astype(np.int64)
        if (ids < 0).any():
            raise DataError(f"{text!r} holds characters outside the corpus vocabulary")
        return ids

    def decode(self, ids) -> str:
        """Text of ids; ids outside the data symbols (a mask token) print as '_'."""
        ids = [int(i) for i in ids]
        if self.kind == "byte":
            return bytes(i if i < 256 else ord("_") for i in ids).decode("utf-8", "replace")
        return "".join(self.symbols[i] if i < len(self.symbols) else "_" for i in ids)

    def to_json(self) -> dict:
        symbols = None if self.kind == "byte" else "".join(self.symbols)
        return {"kind": self.kind, "symbols": symbols}

    @classmethod
    def from_json(cls, data: dict) -> "Vocabulary":
        return cls(data["kind"], () if data["symbols"] is None else tuple(data["symbols"]))


def embedded_text() -> bytes:
    """The default corpus, shipped with Python: the pydoc topic help texts (about 0.4 MB)."""
    from pydoc_data.topics import topics
    return "\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def _read_chunks(source) -> Iterator[bytes]:
    """Byte chunks of a file path, or of an in-memory bytes object."""
    if isinstance(source, bytes):
        for start in range(0, len(source), CHUNK_BYTES):
            yield source[start:start + CHUNK_BYTES]
        return
    with open(source, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk


def _text8_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.int64)  # 0 = space
    for i, letter in enumerate(TEXT8_SYMBOLS[1:], start=1):
        table[ord(letter)] = table[ord(letter.upper())] = i
    return table


def _codepoints(decoder, chunk: bytes, final: bool) -> np.ndarray:
    try:
        text = decoder.decode(chunk, final)
    except UnicodeDecodeError as err:
        raise DataError(f"the data is not valid UTF-8 ({err}); use --vocab byte") from None
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _encoder(vocab: Vocabulary):
    """A function (bytes chunk, final) -> ids of the symbols it completes; it carries state
    across chunks (a run of spaces, a character split between chunks)."""
    if vocab.kind == "text8":
        table = _text8_table()
        previous_space = [False]

        def encode_text8(chunk, final):
            ids = table[np.frombuffer(chunk, dtype=np.uint8)]
            space = ids == 0
            before = np.concatenate([[previous_space[0]], space[:-1]])
            if len(ids):
                previous_space[0] = bool(space[-1])
            return ids[~(space & before)]
        return encode_text8
    if vocab.kind == "byte":
        return lambda chunk, final: np.frombuffer(chunk, dtype=np.uint8)
    decoder = codecs.getincrementaldecoder("utf-8")()
    points = np.array([ord(s) for s in vocab.symbols], dtype=np.uint32)

    def encode_char(chunk, final):
        cps = _codepoints(decoder, chunk, final)
        ids = np.searchsorted(points, cps)
        unknown = (ids >= len(points)) | (points[np.minimum(ids, len(points) - 1)] != cps)
        return np.where(unknown, -1, ids)  # -1 only in prompts: the corpus defines the symbols
    return encode_char


def _char_vocabulary(source) -> Vocabulary:
    """First pass of the char vocabulary: the sorted set of characters in the source."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    seen = np.zeros(0, dtype=np.uint32)
    for chunk in _read_chunks(source):
        seen = np.union1d(seen, _codepoints(decoder, chunk, False))
    seen = np.union1d(seen, _codepoints(decoder, b"", True))
    if len(seen) > 65535:
        raise DataError(f"the data holds {len(seen)} distinct characters; use --vocab byte")
    return Vocabulary("char", tuple(chr(c) for c in seen))


def tokenize(source, vocab_kind: str, path: Path) -> Tuple[Vocabulary, int]:
    """Stream ``source`` (a file path or bytes) into the token file ``path``, atomically.

    Returns the vocabulary and the number of tokens. The file appears complete or not at all.
    """
    if vocab_kind not in VOCABULARIES:
        raise DataError(f"vocab must be one of {VOCABULARIES}, got {vocab_kind!r}")
    if vocab_kind == "char":
        vocab = _char_vocabulary(source)
    else:
        vocab = Vocabulary(vocab_kind, tuple(TEXT8_SYMBOLS) if vocab_kind == "text8" else ())
    encode = _encoder(vocab)
    count = 0
    with atomic_file(path, "wb") as out:
        pieces = itertools.chain(((c, False) for c in _read_chunks(source)), [(b"", True)])
        for chunk, final in pieces:
            ids = encode(chunk, final)
            out.write(ids.astype(vocab.dtype).tobytes())
            count += len(ids)
    return vocab, count


class TokenCorpus:
    """A tokenised corpus in a run directory: memory-mapped ids, train/validation split."""

    def __init__(self, run_dir: Path, val_fraction: float):
        run_dir = Path(run_dir)
        self.vocab = Vocabulary.from_json(json.loads((run_dir / VOCAB_FILE).read_text()))
        self.tokens = np.memmap(run_dir / TOKENS_FILE, dtype=self.vocab.dtype, mode="r")
        self.val_start = len(self.tokens) - int(math.ceil(len(self.tokens) * val_fraction))

    @property
    def train(self) -> np.ndarray:
        return self.tokens[:self.val_start]

    @property
    def val(self) -> np.ndarray:
        return self.tokens[self.val_start:]


def prepare_corpus(run_dir: Path, data: Optional[str], vocab_kind: str, val_fraction: float,
                   seq_len: int) -> TokenCorpus:
    """Tokenise ``data`` (a path, or None for the embedded corpus) into ``run_dir``.

    Checks that both splits hold at least one sequence; on failure nothing is left behind.
    """
    if data is not None and not Path(data).is_file():
        raise DataError(f"data file {data!r} does not exist")
    run_dir = Path(run_dir)
    try:
        vocab, count = tokenize(embedded_text() if data is None else data, vocab_kind,
                                run_dir / TOKENS_FILE)
    except OSError as err:
        raise DataError(f"cannot read data file {data!r}: {err}") from None
    val_count = int(math.ceil(count * val_fraction))
    if min(val_count, count - val_count) < seq_len:
        (run_dir / TOKENS_FILE).unlink()
        raise DataError(f"the corpus has {count} tokens: too few for a training and a validation "
                        f"split of at least seq_len={seq_len} tokens each")
    write_json_atomic(run_dir / VOCAB_FILE, vocab.to_json())
    return TokenCorpus(run_dir, val_fraction)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one training step: a function of (seed, step) only, so every rank, and a
    resumed run, draws the same global batch."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def read_windows(split: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    """(B, seq_len) int64 token windows starting at ``starts`` (B,); reads only those pages."""
    index = starts[:, None] + np.arange(seq_len)[None, :]
    return torch.from_numpy(split[index].astype(np.int64))


def batch_starts(split_len: int, global_batch: int, seq_len: int,
                 generator: torch.Generator) -> np.ndarray:
    """(global_batch,) random window starts, uniform over the split."""
    return torch.randint(0, split_len - seq_len + 1, (global_batch,), generator=generator).numpy()


def eval_windows(split: np.ndarray, seq_len: int, max_sequences: int) -> np.ndarray:
    """Starts of non-overlapping windows covering the split, evenly thinned to at most
    ``max_sequences`` (0 = all)."""
    starts = np.arange(0, len(split) - seq_len + 1, seq_len)
    if 0 < max_sequences < len(starts):
        starts = starts[np.linspace(0, len(starts) - 1, max_sequences).round().astype(np.int64)]
    return starts


def entropies(tokens: np.ndarray, vocab_size: int) -> Tuple[float, float]:
    """Plug-in unigram entropy H(X) and bigram conditional entropy H(X_i | X_{i-1}), in bits.

    Both are measured on ``tokens`` itself (in-sample), the bar an n-gram model could at best
    reach on that text. Counted in chunks, so a memory-mapped array is never loaded whole.
    """
    pairs = np.zeros(vocab_size * vocab_size, dtype=np.int64)
    for start in range(0, max(len(tokens) - 1, 0), CHUNK_BYTES):
        chunk = np.asarray(tokens[start:start + CHUNK_BYTES + 1], dtype=np.int64)
        pairs += np.bincount(chunk[:-1] * vocab_size + chunk[1:], minlength=len(pairs))
    pairs = pairs.reshape(vocab_size, vocab_size).astype(np.float64)
    total = pairs.sum()
    if total == 0:
        return 0.0, 0.0
    unigram = pairs.sum(1) / total
    joint = pairs / total

    def plogp(p):
        return np.where(p > 0, p * np.log2(np.where(p > 0, p, 1)), 0.0).sum()

    h1 = -plogp(unigram)
    return float(h1), float(-plogp(joint) - h1)
