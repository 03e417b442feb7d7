"""Drop-ins for LLaDA's sampler (ML-GSAI/LLaDA generate.py), Fast-dLLM's confidence threshold
(NVlabs/Fast-dLLM llada/generate.py) and LLaDA's training loss.

LLaDA's masked positions carry no time input; its vocabulary includes the mask token, which
LLaDA does not exclude from sampling or the loss, and neither do these functions.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _checks
from ..ops.ctmc_step import ctmc_step
from ..ops.loss import fused_tcsm_loss
from ..sampling import top_per_row
from . import _args

REMASKINGS = ("low_confidence", "random")


def _check_temperature(temperature) -> float:
    temperature = _args.real("temperature", temperature)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    return temperature


def _check_remasking(remasking) -> str:
    if remasking not in REMASKINGS:  # LLaDA and Fast-dLLM raise NotImplementedError here
        raise NotImplementedError(f"remasking must be one of {REMASKINGS}, got {remasking!r}")
    return remasking


def _check_mask_index(mask_index) -> torch.Tensor:
    mask_index = _args.mask("mask_index", mask_index)
    if mask_index.dim() != 2:
        raise ValueError(f"mask_index must have shape (B, L), got {tuple(mask_index.shape)}")
    return mask_index


def add_gumbel_noise(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """LLaDA's Gumbel-max perturbation of logits (..., V), in float64 as LLaDA's:
    exp(z) / (-log u) ** T with u = torch.rand_like, whose argmax is a draw from softmax(z / T)
    (log of it: z - T log(-log u), Gumbel noise scaled by T). ``temperature`` 0 returns the
    logits unchanged. Same values as LLaDA's under the same torch seed."""
    _checks.tensor("logits", logits, _checks.FLOAT_DTYPES)
    if _check_temperature(temperature) == 0:
        return logits
    logits = logits.to(torch.float64)
    return logits.exp() / (-torch.log(torch.rand_like(logits))) ** temperature


def get_num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) int64: masked count per row split over ``steps``, the remainder going to the
    first steps (LLaDA's linear schedule). mask_index (B, L) bool or 0/1 integers."""
    mask_index = _check_mask_index(mask_index)
    steps = _args.integer("steps", steps, 1)
    masked = mask_index.sum(dim=1, keepdim=True)
    first_steps = torch.arange(steps, device=mask_index.device) < masked % steps
    return masked // steps + first_steps.long()


def _check_counts(num_transfer_tokens, batch: int, device) -> torch.Tensor:
    """(B,) int64 from a count per row (a (B,) or (B, 1) tensor) or one integer for all rows."""
    if not isinstance(num_transfer_tokens, torch.Tensor):
        return torch.full((batch,), _args.integer("num_transfer_tokens", num_transfer_tokens, 0),
                          device=device)
    _checks.tensor("num_transfer_tokens", num_transfer_tokens, _checks.INDEX_DTYPES)
    if num_transfer_tokens.numel() not in (1, batch):
        raise ValueError(f"num_transfer_tokens must hold 1 or B={batch} counts, got shape "
                         f"{tuple(num_transfer_tokens.shape)}")
    return num_transfer_tokens.to(device=device, dtype=torch.int64).reshape(-1).expand(batch)


def get_transfer_index(logits: torch.Tensor, temperature: float, remasking: str,
                       mask_index: torch.Tensor, x: torch.Tensor, num_transfer_tokens,
                       threshold: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fast-dLLM's per-step proposal and selection. logits (B, L, V), mask_index and x (B, L).

    x0: the argmax for ``temperature`` 0, else a draw from softmax(logits / T) by the fused step
    op (Philox seed drawn from torch's global generator, so ``torch.manual_seed`` makes it
    reproducible); non-masked positions keep x. Confidence: p(x0) under softmax(logits)
    ("low_confidence") or torch.rand ("random", the originals' draw). transfer_index (B, L)
    bool: per row the ``num_transfer_tokens[b]`` most confident masked positions (ties: lower
    position first); with ``threshold``, every masked position whose confidence is >= threshold,
    and at least the most confident one (``num_transfer_tokens`` is then unused). Unlike the
    original's topk, transfer_index never marks an unmasked position (there x0 == x, so applying
    it gives the same x). Returns (x0 (B, L) int64, transfer_index).
    """
    _checks.rows_and_ids("logits", logits, "x", x)
    mask_index = _check_mask_index(mask_index)
    if logits.dim() != 3 or x.shape != mask_index.shape:
        raise ValueError(f"logits (B, L, V), x and mask_index (B, L) disagree: "
                         f"{tuple(logits.shape)}, {tuple(x.shape)}, {tuple(mask_index.shape)}")
    _check_remasking(remasking)
    temperature = _check_temperature(temperature)
    if threshold is not None:
        threshold = _args.real("threshold", threshold)
    elif num_transfer_tokens is None:
        raise ValueError("num_transfer_tokens is required when threshold is None")
    batch = x.shape[0]

    if temperature == 0:
        x0 = logits.argmax(dim=-1)
    else:
        out = ctmc_step(logits, x, torch.zeros((), device=x.device), temperature=temperature,
                        seed=_args.draw_seed(), return_x1=True,
                        return_confidence=remasking == "low_confidence" and temperature == 1.0)
        x0 = out.x1
    if remasking == "low_confidence":
        if temperature == 1.0:
            confidence = out.prob
        else:
            z = logits.float()
            confidence = torch.exp(z.gather(-1, x0[..., None])[..., 0] - torch.logsumexp(z, -1))
    else:
        confidence = torch.rand(x0.shape, device=x0.device)
    x0 = torch.where(mask_index, x0, x.long())

    if threshold is not None:
        most_confident = top_per_row(confidence, mask_index,
                                     torch.ones(batch, dtype=torch.int64, device=x.device))
        return x0, mask_index & ((confidence >= threshold) | most_confident)
    return x0, top_per_row(confidence, mask_index, _check_counts(num_transfer_tokens, batch,
                                                                 x.device))


def _model_logits(model, x: torch.Tensor, prompt_index: torch.Tensor, mask_id: int,
                  cfg_scale: float) -> torch.Tensor:
    """LLaDA's model call: ``model(x).logits`` (or a plain tensor), with unsupervised
    classifier-free guidance for cfg_scale > 0, the unconditional input masking the prompt:
        z = z_uncond + (cfg_scale + 1) (z_cond - z_uncond)."""
    def logits_of(inputs):
        out = model(inputs)
        logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
        _checks.tensor("the model's logits (model(x) or model(x).logits)", logits)
        return logits

    if not cfg_scale > 0:
        return logits_of(x)
    unconditional = torch.where(prompt_index, mask_id, x)
    logits, un_logits = torch.chunk(logits_of(torch.cat([x, unconditional], dim=0)), 2, dim=0)
    return un_logits + (cfg_scale + 1) * (logits - un_logits)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, steps: int = 128, gen_length: int = 128,
             block_length: int = 128, temperature: float = 0.0, cfg_scale: float = 0.0,
             remasking: str = "low_confidence", mask_id: int = 126336,
             threshold: Optional[float] = None) -> torch.Tensor:
    """LLaDA's semi-autoregressive sampler, each step one ``get_transfer_index`` (fused step op
    for temperature > 0). prompt (B, P) ids -> x (B, P + gen_length) int64.

    ``gen_length`` masks follow the prompt, revealed in ``gen_length / block_length`` blocks,
    left to right, with ``steps`` split evenly over the blocks. Each step calls ``model`` on x
    (``model(x).logits`` or a tensor (B, L, V); with ``cfg_scale`` > 0 on [x; x with the prompt
    masked] stacked, as LLaDA), proposes x0 (argmax at ``temperature`` 0) and reveals the
    ``remasking``-most-confident masked positions of the current block: LLaDA's linear count
    per step, or with ``threshold`` (Fast-dLLM) every position at least that confident and at
    least one, until the block holds no mask. x lives on the prompt's device. With temperature
    0 the tokens equal the originals'; with temperature > 0 the draws are Philox ones (same
    distribution, another stream).
    """
    _checks.token_matrix("prompt", prompt, "(B, P)")
    steps = _args.integer("steps", steps, 1)
    gen_length = _args.integer("gen_length", gen_length, 1)
    block_length = _args.integer("block_length", block_length, 1)
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} must be a multiple of "
                         f"block_length={block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps={steps} must be a multiple of the number of blocks "
                         f"{num_blocks} (gen_length / block_length)")
    _check_temperature(temperature)
    cfg_scale = _args.real("cfg_scale", cfg_scale)
    _check_remasking(remasking)
    mask_id = _args.integer("mask_id", mask_id, 0)
    if threshold is not None:
        threshold = _args.real("threshold", threshold)

    batch, prompt_length = prompt.shape
    x = torch.full((batch, prompt_length + gen_length), mask_id, dtype=torch.long,
                   device=prompt.device)
    x[:, :prompt_length] = prompt
    prompt_index = x != mask_id
    steps_per_block = steps // num_blocks
    for block in range(num_blocks):
        end = prompt_length + (block + 1) * block_length
        counts = get_num_transfer_tokens(x[:, end - block_length:end] == mask_id, steps_per_block)
        step = 0
        # LLaDA: steps_per_block steps; Fast-dLLM (threshold): until the block holds no mask
        while (step < steps_per_block if threshold is None
               else bool((x[:, end - block_length:end] == mask_id).any())):
            mask_index = x == mask_id
            mask_index[:, end:] = False
            logits = _model_logits(model, x, prompt_index, mask_id, cfg_scale)
            x0, transfer = get_transfer_index(logits, temperature, remasking, mask_index, x,
                                              counts[:, step] if threshold is None else None,
                                              threshold)
            x = torch.where(transfer, x0, x)
            step += 1
    return x


def masked_ce(logits: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor,
              p_mask: torch.Tensor) -> torch.Tensor:
    """LLaDA's pre-training loss: sum over masked positions of CE(logits, ids) / p_mask, divided
    by B * L. logits (B, L, V), ids (B, L), masked (B, L) bool or 0/1, p_mask broadcastable to
    (B, L). One fused call: divergence "kl", weight = [masked] / p_mask, normalizer B * L."""
    _, batch_shape = _checks.rows_and_ids("logits", logits, "ids", ids)
    masked = _args.mask("masked", masked)
    if masked.shape != ids.shape:
        raise ValueError(f"masked must have the shape of ids {batch_shape}, got "
                         f"{tuple(masked.shape)}")
    _checks.tensor("p_mask", p_mask, _checks.FLOAT_DTYPES)
    p_mask = _checks.broadcast("p_mask", p_mask, batch_shape)
    weight = torch.where(masked, 1 / p_mask.float(), 0)
    return fused_tcsm_loss(logits, ids, divergence="kl", weight=weight, reduction="mean",
                           normalizer=float(ids.numel()))
