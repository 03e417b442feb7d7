"""Transcriptions of LLaDA's and Fast-dLLM's samplers, run beside the adapters in the tests.

``llada_*`` follow ML-GSAI/LLaDA generate.py at commit f51cb1731f5a40ba35c15e51b6b66b147e689f24
(add_gumbel_noise, get_num_transfer_tokens, generate); ``fast_dllm_*`` follow NVlabs/Fast-dLLM
llada/generate.py at commit 24cc59e75f20a6384bae8c905965bb090b96388e (get_transfer_index,
generate). The torch calls that draw random numbers come in the originals' order, so one torch
seed gives both the same draws. ``model.device`` and ``model(x).logits`` as the originals use.
"""
import math

import torch
import torch.nn.functional as F


def llada_add_gumbel_noise(logits, temperature):
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits, dtype=torch.float64)
    return logits.exp() / (-torch.log(noise)) ** temperature


def llada_num_transfer_tokens(mask_index, steps):
    mask_num = mask_index.sum(dim=1, keepdim=True)
    out = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + mask_num // steps
    for row in range(mask_num.size(0)):
        out[row, :mask_num[row] % steps] += 1
    return out


def llada_generate(model, prompt, steps, gen_length, block_length, temperature, cfg_scale,
                   remasking, mask_id):
    """LLaDA's generate (batch of one, as at that commit)."""
    x = torch.full((1, prompt.shape[1] + gen_length), mask_id, dtype=torch.long).to(model.device)
    x[:, :prompt.shape[1]] = prompt.clone()
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    for block in range(num_blocks):
        start = prompt.shape[1] + block * block_length
        counts = llada_num_transfer_tokens(x[:, start:start + block_length] == mask_id, steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits, un_logits = torch.chunk(model(torch.cat([x, un_x], dim=0)).logits, 2,
                                                dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x).logits
            x0 = torch.argmax(llada_add_gumbel_noise(logits, temperature), dim=-1)
            if remasking == "low_confidence":
                x0_p = torch.gather(F.softmax(logits, dim=-1), -1, x0[..., None])[..., 0]
            elif remasking == "random":
                x0_p = torch.rand((x0.shape[0], x0.shape[1]), device=x0.device)
            else:
                raise NotImplementedError(remasking)
            x0_p[:, start + block_length:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -math.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select = torch.topk(confidence[j], k=int(counts[j, i]))
                transfer[j, select] = True
            x[transfer] = x0[transfer]
    return x


def fast_dllm_transfer_index(logits, temperature, remasking, mask_index, x,
                             num_transfer_tokens, threshold=None):
    x0 = torch.argmax(llada_add_gumbel_noise(logits, temperature), dim=-1)
    if remasking == "low_confidence":
        p = F.softmax(logits.to(torch.float64), dim=-1)
        x0_p = torch.gather(p, -1, x0[..., None])[..., 0]
    elif remasking == "random":
        x0_p = torch.rand((x0.shape[0], x0.shape[1]), device=x0.device)
    else:
        raise NotImplementedError(remasking)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -math.inf)
    transfer = torch.zeros_like(x0, dtype=torch.bool)
    if threshold is not None:
        num_transfer_tokens = mask_index.sum(dim=1, keepdim=True)
    for j in range(confidence.shape[0]):
        _, select = torch.topk(confidence[j], k=int(num_transfer_tokens[j]))
        transfer[j, select] = True
        if threshold is not None:
            for k in range(1, int(num_transfer_tokens[j])):
                if confidence[j, select[k]] < threshold:
                    transfer[j, select[k]] = False
    return x0, transfer


def fast_dllm_generate(model, prompt, steps, gen_length, block_length, temperature, remasking,
                       mask_id, threshold):
    """Fast-dLLM's generate without cache (batch of one); returns (x, number of model calls)."""
    x = torch.full((1, prompt.shape[1] + gen_length), mask_id, dtype=torch.long).to(model.device)
    x[:, :prompt.shape[1]] = prompt.clone()
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    nfe = 0
    for block in range(num_blocks):
        start = prompt.shape[1] + block * block_length
        counts = llada_num_transfer_tokens(x[:, start:start + block_length] == mask_id, steps)
        i = 0
        while True:
            nfe += 1
            mask_index = x == mask_id
            logits = model(x).logits
            mask_index[:, start + block_length:] = 0
            x0, transfer = fast_dllm_transfer_index(
                logits, temperature, remasking, mask_index, x,
                counts[:, i] if threshold is None else None, threshold)
            x[transfer] = x0[transfer]
            i += 1
            if (x[:, start:start + block_length] == mask_id).sum() == 0:
                break
    return x, nfe
