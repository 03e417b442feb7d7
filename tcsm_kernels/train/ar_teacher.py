"""An autoregressive (causal) teacher and its top-K concrete scores (docs/math.md 6).

The teacher reuses the denoiser's blocks with a causal attention mask. It reads
``[BOS, x_0, ..., x_{L-1}]`` (BOS = the id after the data symbols, the column the masked student
uses for its mask token) and its output at position i is log p(x_i | x_<i) over the V data
symbols. The embedding of x_i sits at input position i + 1, so it reaches only the terms j > i:
one backward of the total log-likelihood sum_j log p(x_j | x_<j) gives every future gradient g_i.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import checkpoint, distributed
from .data import TokenCorpus, batch_starts, eval_windows, read_windows, step_generator
from .model import Block, Denoiser, DenoiserConfig, rotate
from .run import CHECKPOINT_DIR, ConfigError, LossInfo, TrainConfig, read_config
from .trainer import Session, Trainer, train_single_process

TEACHER_FILE = "ar_teacher.json"


class CausalBlock(Block):
    """``Block`` with causal attention: position i attends to positions <= i."""

    def forward(self, x: torch.Tensor, rotary: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(b, length, 3, self.n_heads, -1).transpose(1, 3)
        q, k, v = qkv.unbind(2)
        h = F.scaled_dot_product_attention(rotate(q, rotary), rotate(k, rotary), v,
                                           is_causal=True)
        x = x + self.attn_out(h.transpose(1, 2).reshape(b, length, d))
        return x + self.mlp(self.mlp_norm(x))


class CausalTeacher(Denoiser):
    """Causal LM over ``data_vocab`` symbols plus BOS (id ``data_vocab``), for sequences of
    ``seq_len`` tokens."""

    def __init__(self, data_vocab: int, seq_len: int, d_model: int, n_layers: int, n_heads: int):
        super().__init__(DenoiserConfig(data_vocab + 1, seq_len + 1, d_model, n_layers, n_heads))
        self.data_vocab = data_vocab
        self.blocks = torch.nn.ModuleList(CausalBlock(d_model, n_heads, self.config.mlp_ratio)
                                          for _ in range(n_layers))
        self.blocks.apply(self._init_weights)

    @property
    def bos_id(self) -> int:
        return self.data_vocab

    def input_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L + 1, D) embeddings of [BOS, x] for x (B, L)."""
        bos = torch.full_like(x[:, :1], self.bos_id)
        return self.token_embedding(torch.cat([bos, x], dim=1))

    def next_token_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, L, V) logits of x_i given x_<i from the input embeddings (B, L + 1, D)."""
        h = embeddings
        for block in self.blocks:
            h = block(h, self.rotary)
        head = self.token_embedding.weight[:self.data_vocab]
        return F.linear(self.final_norm(h[:, :-1]), head)

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, V) float32 log p(y | x_<i) for data ids x (B, L)."""
        return torch.log_softmax(self.next_token_logits(self.input_embeddings(x)).float(), -1)

    def sequence_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) log p(x) = sum_i log p(x_i | x_<i)."""
        return self.log_probs(x).gather(-1, x[..., None])[..., 0].sum(-1)

    def log_probs_and_future_gradient(self, x: torch.Tensor
                                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """log p(y | x_<i) (B, L, V) and g_i = d sum_{j>i} log p(x_j | x_<j) / d e(x_i)
        (B, L, D), the latter from one backward of the total log-likelihood."""
        with torch.enable_grad():
            embeddings = self.input_embeddings(x).detach().requires_grad_(True)
            log_probs = torch.log_softmax(self.next_token_logits(embeddings).float(), -1)
            total = log_probs.gather(-1, x[..., None]).sum()
            (gradient,) = torch.autograd.grad(total, embeddings)
        return log_probs.detach(), gradient[:, 1:]


def ar_topk_targets(teacher: CausalTeacher, x: torch.Tensor, k: int, temperature: float = 1.0,
                    taylor: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sparse targets of the AR teacher at every position of clean x (B, L): candidate ids
    (B, L, k) and log concrete ratios (B, L, k) float32 — the local term
    (log p(y|x_<i) - log p(x_i|x_<i)) / tau from the fused top-k op, plus with ``taylor`` the
    first-order future term (E_y - E_{x_i}) . g_i / tau (the tempered sequence-level target)."""
    from ..ops.topk_scores import topk_concrete_scores

    if not 0 < k <= teacher.data_vocab:
        raise ConfigError(f"--k must lie in [1, {teacher.data_vocab}] (the teacher's vocabulary);"
                          f" got {k}")
    with torch.no_grad():
        if taylor:
            log_probs, gradient = teacher.log_probs_and_future_gradient(x)
        else:
            log_probs = teacher.log_probs(x)
        indices, log_ratios, _ = topk_concrete_scores(log_probs, x, k, temperature=temperature)
        if taylor:
            table = teacher.token_embedding.weight
            step = table[indices] - table[x][..., None, :]  # (B, L, k, D)
            log_ratios = log_ratios + (step * gradient[..., None, :]).sum(-1) / temperature
    return indices, log_ratios


def is_teacher_run(run_dir: Path) -> bool:
    return (Path(run_dir) / TEACHER_FILE).is_file()


def build_teacher(config: TrainConfig, data_vocab: int) -> CausalTeacher:
    return CausalTeacher(data_vocab, config.seq_len, config.d_model, config.n_layers,
                         config.n_heads)


def load_teacher(path: str, device: torch.device = torch.device("cpu")
                 ) -> Tuple[CausalTeacher, TrainConfig, TokenCorpus]:
    """The frozen teacher of a ``tcsm train-ar`` run, from its directory or a checkpoint file
    inside it (RUN/checkpoints/*.pt)."""
    given = Path(path)
    run_dir = given.parent.parent if given.is_file() else given
    if not given.exists():
        raise ConfigError(f"--teacher {path}: no such run directory or checkpoint")
    if not is_teacher_run(run_dir):
        raise ConfigError(f"--teacher {path} is not an autoregressive teacher run "
                          f"(train one with `tcsm train-ar`)")
    config = read_config(run_dir)
    corpus = TokenCorpus(run_dir, config.val_fraction)
    state = checkpoint.load(given if given.is_file()
                            else run_dir / CHECKPOINT_DIR / checkpoint.LAST)
    teacher = build_teacher(config, corpus.vocab.size)
    teacher.load_state_dict(state["model"])
    teacher.requires_grad_(False)
    return teacher.to(device).eval(), config, corpus


@torch.no_grad()
def teacher_bits(teacher: CausalTeacher, split, seq_len: int, max_sequences: int,
                 device: torch.device, batch_size: int = 256) -> float:
    """Exact negative log-likelihood of validation windows, bits per token."""
    was_training = teacher.training
    teacher.eval()
    starts = eval_windows(split, seq_len, max_sequences)
    total = 0.0
    for begin in range(0, len(starts), batch_size):
        x = read_windows(split, starts[begin:begin + batch_size], seq_len).to(device)
        total -= teacher.sequence_log_prob(x).sum().item()
    teacher.train(was_training)
    return total / (len(starts) * seq_len) / 0.6931471805599453


class TeacherTrainer(Trainer):
    """The pre-training loop (schedule, logging, checkpoints) with a causal LM and the
    cross-entropy loss ``fused_tcsm_loss(divergence="kl")``, BOS excluded from the softmax."""

    def __init__(self, config: TrainConfig, session: Session, run_dir: Path,
                 world: distributed.World):
        super().__init__(config, session, run_dir, world)
        torch.manual_seed(config.seed)
        self.replace_model(build_teacher(config, self.corpus.vocab.size))

    def loss_info(self) -> LossInfo:
        return LossInfo("data (next token)", "kl", "mean over all positions", estimate=False)

    def clean_batch(self) -> torch.Tensor:
        """(B, L) training windows of step ``self.step`` (a function of seed and step)."""
        config = self.config
        generator = step_generator(config.seed, self.step)
        starts = batch_starts(len(self.corpus.train), config.batch_size, config.seq_len,
                              generator)
        return read_windows(self.corpus.train, starts, config.seq_len).to(self.world.device)

    def train_step(self, ddp) -> None:
        from ..ops.loss import fused_tcsm_loss

        self.step += 1
        x = self.clean_batch()
        logits = self.model.next_token_logits(self.model.input_embeddings(x))
        loss = fused_tcsm_loss(logits, x, divergence="kl")
        self.step_on_loss(loss)

    def evaluate(self) -> None:
        began = time.perf_counter()
        bits = teacher_bits(self.model, self.corpus.val, self.config.seq_len,
                            self.config.eval_sequences, self.world.device)
        self.metrics.write([{"step": self.step, "val_bits": bits}])
        self.eval_seconds += time.perf_counter() - began


def train_teacher(config: Optional[TrainConfig], session: Session) -> dict:
    """`tcsm train-ar`: train (or resume) a causal teacher run in ``session.out``."""
    return train_single_process(TeacherTrainer, config, session,
                                run_files={TEACHER_FILE: {"model": "causal"}})
