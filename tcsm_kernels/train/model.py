"""A small bidirectional transformer denoiser: x_t (B, L) ids, t (B,) -> logits (B, L, V).

Pre-norm blocks with full (non-causal) attention and rotary position embeddings (relative
positions: attending to a neighbour is easy from the first step, which matters for a model
trained for minutes), an optional time embedding added to every position, and an output head
tied to the token embedding. The logits cover the
whole model vocabulary, the mask token included; the loss and the samplers exclude that column
through ``mask_id``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DenoiserConfig:
    vocab_size: int  # data symbols (+ 1 mask token for the masked process)
    seq_len: int
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    time_conditioning: bool = False


def rotary_tables(length: int, head_dim: int) -> torch.Tensor:
    """(2, length, head_dim / 2) cos and sin of position x frequency, frequencies 10000^(-2i/d)."""
    freqs = 10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.arange(length).float()[:, None] * freqs[None, :]
    return torch.stack([angles.cos(), angles.sin()])


def rotate(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, H, L, head_dim): each (first-half, second-half) pair of
    channels is rotated by its position's angle."""
    cos, sin = tables[0, :x.shape[2]], tables[1, :x.shape[2]]
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)). x (B, L, D)."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int):
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.attn_out = nn.Linear(d_model, d_model)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model))

    def forward(self, x: torch.Tensor, rotary: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(b, length, 3, self.n_heads, -1).transpose(1, 3)
        q, k, v = qkv.unbind(2)  # (B, H, L, head_dim)
        h = F.scaled_dot_product_attention(rotate(q, rotary), rotate(k, rotary), v)
        x = x + self.attn_out(h.transpose(1, 2).reshape(b, length, d))
        return x + self.mlp(self.mlp_norm(x))


def time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features (B, dim) of times t (B,) in [0, 1]."""
    freqs = torch.exp(torch.arange(dim // 2, device=t.device) * (-math.log(1000.0) / (dim // 2)))
    angles = 1000.0 * t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Denoiser(nn.Module):
    """Predicts the clean token at every position: logits (B, L, V) of p(x_1^i | x_t)."""

    def __init__(self, config: DenoiserConfig):
        super().__init__()
        if config.d_model % config.n_heads:
            raise ValueError(f"d_model={config.d_model} is not divisible by "
                             f"n_heads={config.n_heads}")
        self.config = config
        d = config.d_model
        self.token_embedding = nn.Embedding(config.vocab_size, d)
        self.register_buffer("rotary", rotary_tables(config.seq_len, d // config.n_heads),
                             persistent=False)
        self.time_mlp = (nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
                         if config.time_conditioning else None)
        self.blocks = nn.ModuleList(Block(d, config.n_heads, config.mlp_ratio)
                                    for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(d)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor,
                features_only: bool = False) -> torch.Tensor:
        """x_t (B, L) int64, t (B,) float (1 = clean) -> logits (B, L, V) float, or with
        ``features_only`` the final hidden states (B, L, D) that the tied head
        (``token_embedding.weight``) maps to them."""
        h = self.token_embedding(x_t)
        if self.time_mlp is not None:
            h = h + self.time_mlp(time_features(t, self.config.d_model))[:, None, :]
        for block in self.blocks:
            h = block(h, self.rotary)
        h = self.final_norm(h)
        return h if features_only else F.linear(h, self.token_embedding.weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
