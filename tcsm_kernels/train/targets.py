"""Teacher targets for distillation (docs/math.md 6): the full-context conditional of the clean
window at every position, computed once per window and cached.

TCSM's target at a masked position i is the concrete score of p_1 at the clean sequence, i.e.
the conditional q_i(y) = p_1(y | x^{\\i}) given the whole clean context. For an AR teacher

    log q_i(y) = log p(y | x_<i) + sum_{j>i} log p(x_j | x_<j, x_i = y) + const      (local + future)

computed EXACTLY here: per position, one batched pass over the suffix for every candidate y,
reusing the clean prefix's keys and values (every candidate sequence shares them), so a window
costs about |C| L / 2 token passes. A bidirectional teacher (a masked denoiser) gives q_i
directly with only position i masked: L token passes per window. The first-order Taylor
estimate of the future term is kept as a diagnostic (``taylor_future_terms``).

``TargetStore`` holds top-K (indices, log-probabilities) per window of a fixed pool of windows
as .npy files, memory-mapped; ``build_targets`` writes it resumably (finished windows are never
redone) and atomically (the directory appears under its name only when complete).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .data import read_windows
from .files import write_json_atomic
from .model import rotate
from .progress import format_seconds

META_FILE = "meta.json"
ARRAYS = ("starts", "indices", "log_probs")
KINDS = ("ar", "denoiser")


class TargetError(ValueError):
    """A targets store that does not fit the run, or is damaged."""


# ---- the AR teacher's exact full-context scores ---------------------------------------------

def _attend(block, h: torch.Tensor, rotary: torch.Tensor, offset: int,
            past: Optional[Tuple[torch.Tensor, torch.Tensor]]):
    """One causal block on inputs h (B, n, D) at positions offset.. offset + n - 1, attending
    to ``past`` (keys, values (B, H, offset, hd) of the positions before) and causally to h.
    Returns the block's output and h's own (rotated) keys and values."""
    b, n, d = h.shape
    qkv = block.qkv(block.attn_norm(h)).view(b, n, 3, block.n_heads, -1).transpose(1, 3)
    q, k, v = qkv.unbind(2)
    tables = rotary[:, offset:offset + n]
    q, k = rotate(q, tables), rotate(k, tables)
    if past is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        keys, values = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        # query s (position offset + s) sees every past key and suffix keys up to s
        visible = torch.ones(n, offset + n, dtype=torch.bool, device=h.device).tril(offset)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
    h = h + block.attn_out(out.transpose(1, 2).reshape(b, n, d))
    return h + block.mlp(block.mlp_norm(h)), (k, v)


def _head_log_probs(teacher, h: torch.Tensor) -> torch.Tensor:
    head = teacher.token_embedding.weight[:teacher.data_vocab]
    return torch.log_softmax(F.linear(teacher.final_norm(h), head).float(), -1)


def local_candidates(local_log_probs: torch.Tensor, x: torch.Tensor, count: int) -> torch.Tensor:
    """(B, L, count) distinct candidates per position: the teacher's ``count - 1`` locally most
    likely symbols and the clean token (or the count-th most likely one where the clean token
    is already among them)."""
    best = local_log_probs.topk(count, dim=-1).indices
    among = (best[..., :-1] == x[..., None]).any(-1, keepdim=True)
    best[..., -1:] = torch.where(among, best[..., -1:], x[..., None])
    return best


@torch.no_grad()
def ar_full_context_scores(teacher, x: torch.Tensor,
                           candidates: Optional[torch.Tensor] = None):
    """Exact log q_i(c) - log q_i(x_i) = log p(x with x_i = c) - log p(x) of a causal teacher.

    x (B, L) clean windows; candidates (B, L, C) symbols per position (default: all V).
    Returns (scores (B, L, C) float32, candidates (B, L, C), local log p(y | x_<i) (B, L, V)).
    """
    b, length = x.shape
    h = teacher.input_embeddings(x)
    caches = []
    for block in teacher.blocks:
        h, kv = _attend(block, h, teacher.rotary, 0, None)
        caches.append(kv)
    local = _head_log_probs(teacher, h[:, :-1])  # (B, L, V): input j predicts x_j
    clean = local.gather(-1, x[..., None])[..., 0]  # (B, L) log p(x_j | x_<j)
    if candidates is None:
        candidates = torch.arange(teacher.data_vocab, device=x.device).expand(b, length, -1)
    count = candidates.shape[-1]
    scores = local.gather(-1, candidates) - clean[..., None]  # the local term
    for i in range(length - 1):
        # input position i + 1 holds x_i; the suffix inputs are [c, x_{i+1}, ..., x_{L-2}] at
        # positions i + 1 .. L - 1, predicting x_{i+1} .. x_{L-1}.
        suffix = torch.cat([candidates[:, i].reshape(-1, 1),
                            x[:, i + 1:length - 1].repeat_interleave(count, 0)], 1)
        hs = teacher.token_embedding(suffix)
        for block, (keys, values) in zip(teacher.blocks, caches):
            past = (keys[:, :, :i + 1].repeat_interleave(count, 0),
                    values[:, :, :i + 1].repeat_interleave(count, 0))
            hs, _ = _attend(block, hs, teacher.rotary, i + 1, past)
        future = _head_log_probs(teacher, hs).gather(
            -1, x[:, i + 1:].repeat_interleave(count, 0)[..., None])[..., 0].sum(1)
        scores[:, i] += future.view(b, count) - clean[:, i + 1:].sum(1, keepdim=True)
    return scores, candidates, local


@torch.no_grad()
def denoiser_log_probs(denoiser, x: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(B, L, V) log p(y | x^{\\i}) of a masked-diffusion denoiser: each position masked alone in
    an otherwise clean window (t = 1), the mask column excluded. V = data symbols."""
    b, length = x.shape
    masked = x.repeat_interleave(length, 0)
    rows = torch.arange(b * length, device=x.device)
    masked[rows, rows % length] = mask_id
    logits = denoiser(masked, torch.ones(b * length, device=x.device)).float()
    own = logits.view(b, length, length, -1)[:, torch.arange(length), torch.arange(length)]
    own[..., mask_id] = float("-inf")
    keep = [c for c in range(own.shape[-1]) if c != mask_id]
    return torch.log_softmax(own[..., keep], -1)


def taylor_future_terms(teacher, x: torch.Tensor) -> torch.Tensor:
    """(B, L, V) first-order estimate (E_y - E_{x_i}) . g_i of the future term, with g_i the
    gradient of sum_{j>i} log p(x_j | x_<j) in the embedding of x_i (one backward)."""
    _, gradient = teacher.log_probs_and_future_gradient(x)
    table = teacher.token_embedding.weight[:teacher.data_vocab]
    with torch.no_grad():
        return (gradient @ table.T) - (gradient * table[x]).sum(-1, keepdim=True)


def taylor_check(teacher, x: torch.Tensor) -> dict:
    """How well the Taylor term estimates the exact future term on windows x: correlation,
    sign agreement and the largest absolute Taylor term (nats), over every (position, symbol)
    but the clean one."""
    scores, _, local = ar_full_context_scores(teacher, x)
    exact = scores - (local - local.gather(-1, x[..., None]))
    estimate = taylor_future_terms(teacher, x)
    other = torch.ones_like(exact, dtype=torch.bool).scatter(-1, x[..., None], False)
    exact, estimate = exact[other].double(), estimate[other].double()
    correlation = torch.corrcoef(torch.stack([exact, estimate]))[0, 1]
    return {"correlation": float(correlation),
            "sign_agreement": float(((exact > 0) == (estimate > 0)).double().mean()),
            "max_abs_taylor_nats": float(estimate.abs().max()),
            "pairs": int(exact.numel())}


def topk_of_scores(scores: torch.Tensor, candidates: torch.Tensor, k: int):
    """(indices (B, L, k), log-probabilities (B, L, k)) of q_i = softmax(scores) on the
    candidates, its k most probable first."""
    log_q = torch.log_softmax(scores.float(), -1)
    top = log_q.topk(k, dim=-1)
    return candidates.gather(-1, top.indices), top.values


# ---- the cached store --------------------------------------------------------------------

@dataclass(frozen=True)
class TargetMeta:
    """What a store was built from; a reader checks it against its own run."""

    kind: str            # "ar" or "denoiser"
    teacher: str         # teacher run directory
    teacher_sha256: str  # of the teacher's checkpoint file
    vocab_size: int      # data symbols V
    seq_len: int
    k: int
    candidates: int      # candidates per position (V: all)
    windows: int
    split_tokens: int    # length of the training split the windows start in
    done: int = 0        # windows finished
    build_seconds: float = 0.0  # time spent computing them, over every (resumed) invocation

    def same_build(self, other: "TargetMeta") -> bool:
        progress = {"done": 0, "build_seconds": 0.0}
        return asdict(self) | progress == asdict(other) | progress


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pool_starts(split_len: int, seq_len: int, windows: int) -> np.ndarray:
    """Starts of ``windows`` non-overlapping windows spread evenly over the training split."""
    available = (split_len - seq_len) // seq_len + 1
    if windows > available:
        raise TargetError(f"--windows {windows} exceeds the {available} non-overlapping windows "
                          f"of the training split")
    picks = np.linspace(0, available - 1, windows).round().astype(np.int64)
    return picks * seq_len


class TargetStore:
    """A built (or partly built) store: meta and the memory-mapped arrays starts (W,),
    indices (W, L, k) int16/int32 and log_probs (W, L, k) float32."""

    def __init__(self, path: Path, mode: str = "r"):
        self.path = Path(path)
        meta_file = self.path / META_FILE
        if not meta_file.is_file():
            raise TargetError(f"{self.path} is not a targets store (no {META_FILE}); build one "
                              "with `tcsm distill-targets`")
        try:
            self.meta = TargetMeta(**json.loads(meta_file.read_text()))
            arrays = {name: np.load(self.path / f"{name}.npy", mmap_mode=mode)
                      for name in ARRAYS}
        except (ValueError, TypeError, OSError) as err:
            raise TargetError(f"{self.path}: damaged targets store ({err})") from None
        self.starts, self.indices, self.log_probs = (arrays[n] for n in ARRAYS)
        shape = (self.meta.windows, self.meta.seq_len, self.meta.k)
        if self.indices.shape != shape or self.log_probs.shape != shape or \
                self.starts.shape != (self.meta.windows,):
            raise TargetError(f"{self.path}: arrays do not have the shape {shape} its meta says")

    @staticmethod
    def create(path: Path, meta: TargetMeta, starts: np.ndarray) -> "TargetStore":
        path.mkdir(parents=True)
        shape = (meta.windows, meta.seq_len, meta.k)
        index_dtype = np.int16 if meta.vocab_size <= np.iinfo(np.int16).max else np.int32
        np.save(path / "starts.npy", starts.astype(np.int64))
        for name, dtype in (("indices", index_dtype), ("log_probs", np.float32)):
            np.lib.format.open_memmap(path / f"{name}.npy", mode="w+", dtype=dtype,
                                      shape=shape).flush()
        write_json_atomic(path / META_FILE, asdict(meta))
        return TargetStore(path, mode="r+")

    def commit(self, done: int, seconds: float) -> None:
        """Make windows [0, done) durable: data to disk first, then the count (and the build
        time, ``seconds`` more)."""
        for array in (self.indices, self.log_probs):
            array.flush()
        for name in ("indices", "log_probs"):
            with open(self.path / f"{name}.npy", "rb") as f:
                os.fsync(f.fileno())
        self.meta = TargetMeta(**(asdict(self.meta) | {
            "done": done, "build_seconds": round(self.meta.build_seconds + seconds, 3)}))
        write_json_atomic(self.path / META_FILE, asdict(self.meta))

    def check_for(self, *, vocab_size: int, seq_len: int, k: int, split_tokens: int,
                  teacher: Optional[str] = None) -> None:
        """TargetError naming --targets unless the store fits a run with these settings; also
        validates its content (ids in range, finite log-probabilities summing to <= 1)."""
        meta = self.meta
        problems = []
        if meta.done != meta.windows:
            problems.append(f"it is incomplete ({meta.done}/{meta.windows} windows); finish it "
                            "with `tcsm distill-targets` (it resumes)")
        if meta.vocab_size != vocab_size:
            problems.append(f"its vocabulary has {meta.vocab_size} symbols, the run's "
                            f"{vocab_size}")
        if meta.seq_len != seq_len:
            problems.append(f"its windows have {meta.seq_len} tokens, the run's {seq_len}")
        if meta.k < k:
            problems.append(f"it holds K={meta.k} entries per position, fewer than --k {k}")
        if meta.split_tokens != split_tokens:
            problems.append("it was built on another corpus (training split of "
                            f"{meta.split_tokens} tokens, the run's {split_tokens})")
        if teacher is not None and Path(teacher).resolve() != Path(meta.teacher).resolve():
            problems.append(f"it was built from the teacher {meta.teacher}, not {teacher}")
        if problems:
            raise TargetError(f"--targets {self.path}: " + "; ".join(problems))
        indices = np.asarray(self.indices)
        if indices.min() < 0 or indices.max() >= vocab_size:
            raise TargetError(f"--targets {self.path}: indices outside [0, {vocab_size})")
        log_probs = np.asarray(self.log_probs, dtype=np.float64)
        if np.isnan(log_probs).any() or np.isposinf(log_probs).any():
            raise TargetError(f"--targets {self.path}: log-probabilities are not finite")
        mass = np.exp(log_probs).sum(-1)
        if mass.max() > 1 + 1e-3:
            raise TargetError(f"--targets {self.path}: log-probabilities sum to "
                              f"{mass.max():.6f} > 1 at some position")

    def batch(self, rows: np.ndarray, k: int, device: torch.device):
        """Top-k targets of pool windows ``rows``: (indices (B, L, k) int64, log_probs)."""
        indices = torch.from_numpy(np.asarray(self.indices[rows, :, :k], dtype=np.int64))
        log_probs = torch.from_numpy(np.asarray(self.log_probs[rows, :, :k]))
        return indices.to(device), log_probs.to(device)


def build_targets(out: Path, meta: TargetMeta, split: np.ndarray,
                  compute: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]],
                  *, chunk: int = 64, progress: bool = True) -> TargetStore:
    """Write (or resume) the store ``out``: ``compute(x (B, L)) -> (indices, log_probs)`` for
    every pool window, ``chunk`` windows at a time, durable after each chunk; built in
    ``out.partial`` and renamed to ``out`` when complete. Resuming needs the same build
    (meta); finished windows are not recomputed."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    if out.exists():
        store = TargetStore(out)
        if not store.meta.same_build(meta):
            raise TargetError(f"--out {out} already holds targets of another build")
        return store
    if partial.exists():
        store = TargetStore(partial, mode="r+")
        if not store.meta.same_build(meta):
            raise TargetError(f"{partial} is a partial build with other settings; remove it "
                              "or pass the same options")
    else:
        starts = pool_starts(meta.split_tokens, meta.seq_len, meta.windows)
        store = TargetStore.create(partial, meta, starts)
    began, first = time.perf_counter(), store.meta.done
    for begin in range(store.meta.done, meta.windows, chunk):
        end = min(begin + chunk, meta.windows)
        chunk_began = time.perf_counter()
        x = read_windows(split, np.asarray(store.starts[begin:end]), meta.seq_len)
        indices, log_probs = compute(x)
        store.indices[begin:end] = indices.cpu().numpy()
        store.log_probs[begin:end] = log_probs.cpu().numpy()
        store.commit(end, time.perf_counter() - chunk_began)
        if progress:
            rate = (end - first) / max(time.perf_counter() - began, 1e-9)
            eta = format_seconds((meta.windows - end) / max(rate, 1e-9))
            sys.stderr.write(f"targets {end}/{meta.windows} windows  {rate:.1f} windows/s  "
                             f"ETA {eta}\n")
            sys.stderr.flush()
    del store
    os.replace(partial, out)
    return TargetStore(out)


@torch.no_grad()
def distill_targets(teacher: str, out: str, *, kind: str = "ar", windows: int = 1024, k: int = 0,
                    candidates: int = 0, chunk: int = 64, check_taylor: bool = False,
                    progress: bool = True):
    """`tcsm distill-targets`: the exact full-context targets of a teacher run for a pool of
    ``windows`` training windows, top ``k`` (0: all V) per position, from ``candidates`` per
    position (0: all V; else the local top plus the clean token; AR teachers only). ``kind``
    "ar": a `tcsm train-ar` teacher; "denoiser": a masked-diffusion run, one position masked
    at a time. Returns (the store, the Taylor check or None)."""
    from .ar_teacher import load_teacher
    from .run import CHECKPOINT_DIR, ConfigError, load_trained

    if kind not in KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if windows <= 0 or k < 0 or candidates < 0 or chunk <= 0:
        raise ConfigError("--windows and --chunk must be > 0, --k and --candidates >= 0")
    if kind == "ar":
        model, config, corpus = load_teacher(teacher)
    else:
        trained = load_trained(teacher, device="cpu")
        if not trained.config.masked:
            raise ConfigError(f"--teacher {teacher}: a denoiser teacher must be a masked run")
        model, config, corpus = trained.model.eval(), trained.config, trained.corpus
        mask_id = trained.corpus.vocab.size
    vocab = corpus.vocab.size
    k, candidates = k or vocab, candidates or vocab
    if k > vocab or candidates > vocab:
        raise ConfigError(f"--k {k} and --candidates {candidates} must be <= V = {vocab}")
    if k > candidates:
        raise ConfigError(f"--k {k} exceeds the candidate set (--candidates {candidates})")
    if kind == "denoiser" and candidates != vocab:
        raise ConfigError("--candidates applies to AR teachers (a denoiser scores all V)")
    run_dir = Path(teacher)
    checkpoint_file = (run_dir if run_dir.is_file() else run_dir / CHECKPOINT_DIR / "last.pt")
    meta = TargetMeta(kind, str(run_dir), file_sha256(checkpoint_file), vocab, config.seq_len,
                      k, candidates, windows, len(corpus.train))

    def compute(x: torch.Tensor):
        if kind == "denoiser":
            top = denoiser_log_probs(model, x, mask_id).topk(k, dim=-1)
            return top.indices, top.values
        chosen = None
        if candidates < vocab:
            chosen = local_candidates(model.log_probs(x), x, candidates)
        scores, chosen, _ = ar_full_context_scores(model, x, chosen)
        return topk_of_scores(scores, chosen, k)

    store = build_targets(Path(out), meta, corpus.train, compute, chunk=chunk, progress=progress)
    report = None
    if check_taylor:
        if kind != "ar":
            raise ConfigError("--check-taylor needs an AR teacher")
        sample = read_windows(corpus.train, np.asarray(store.starts[:min(64, windows)]),
                              config.seq_len)
        report = taylor_check(model, sample)
    return store, report
