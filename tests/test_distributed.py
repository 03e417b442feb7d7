"""Vocabulary-parallel loss and step over gloo, 2 and 3 CPU processes with uneven shards
(a 1-column shard included): values and shard gradients equal the single-process reference on
the concatenated logits for every target kind, divergence and option set; sampled tokens equal
the single-process step's; bad input on one rank raises on every rank (no hang)."""
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tcsm_kernels import _backend, fused_linear_tcsm_loss, fused_tcsm_loss, reference
from tcsm_kernels.distributed import (ShardError, vocab_parallel_ctmc_step,
                                      vocab_parallel_linear_tcsm_loss, vocab_parallel_tcsm_loss)
from tcsm_kernels.ops.step_output import StepOutput

from .conftest import backends_for
from .test_loss_options import build, option_sets
from .test_reference import CONFIGS

# (widths per rank, mask ids to try): V = 17 over 2 ranks, V = 17 over 3 with a 1-column shard
# that may hold the mask column (so that rank holds no participating column).
LAYOUTS = {2: ([7, 10], [None, 2, 7, 16]), 3: ([5, 1, 11], [None, 5, 0, 16])}
VOCAB = 17


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard(t, start, width):
    return t[..., start:start + width]


def _check_case(start, width, where, z, target, kw, single, parallel_kw, tol, grad_tol):
    """vocab_parallel_tcsm_loss on this rank's shard of z (and of kw's teacher_logits) against
    ``single`` on the whole: the loss (and the returned LSE and z-loss) and the shard's
    gradient."""
    kw = dict(kw)
    teacher = kw.pop("teacher_logits", None)
    zf = z.clone().requires_grad_()
    want = single(zf, target, teacher_logits=teacher, **kw)
    zs = _shard(z, start, width).clone().requires_grad_()
    got = vocab_parallel_tcsm_loss(
        zs, target, vocab_start=start, vocab_size=VOCAB,
        teacher_logits_shard=None if teacher is None else _shard(teacher, start, width),
        **parallel_kw, **kw)
    pair = (got, want) if not isinstance(got, tuple) else (got.loss, want.loss)
    pair[1].sum().backward()
    pair[0].sum().backward()
    torch.testing.assert_close(pair[0], pair[1], **tol, msg=lambda m: f"{where}: {m}")
    if isinstance(got, tuple):
        torch.testing.assert_close(got.lse, want.lse, msg=where)
        torch.testing.assert_close(got.z_loss, want.z_loss, msg=where)
    torch.testing.assert_close(zs.grad, _shard(zf.grad, start, width), **grad_tol,
                               msg=lambda m: f"{where} grad: {m}")


def _loss_checks(rank, widths, masks):
    """The reference shard pass in float64 against the reference on the whole vocabulary."""
    start, width = sum(widths[:rank]), widths[rank]
    for config in CONFIGS:
        sets = list(option_sets(config).items())
        for mask_id in masks:
            for name, opts in [("plain", {})] + sets[-1:]:
                for reduction in ("mean", "none"):
                    z, target, kw = build(config, opts, n=9, v=VOCAB, k=4, seed=mask_id or 0,
                                          mask_id=mask_id)
                    kw["reduction"] = reduction
                    for key in ("weight", "class_weight", "teacher_logits"):
                        if key in kw:
                            kw[key] = kw[key].double()
                    where = f"{config} {name} mask={mask_id} {reduction} rank={rank}"
                    _check_case(start, width, where, z.double(), target, kw, reference.tcsm_loss,
                                {}, dict(rtol=1e-10, atol=1e-12), dict(rtol=1e-9, atol=1e-12))


def _single_process_fused(*args, **kwargs):
    return fused_tcsm_loss(*args, backend="cpp" if _backend.cpp_available() else "reference",
                           **kwargs)


def _fused_loss_checks(rank, widths, masks):
    """The fused shard pass (each backend forced) against the single-process fused loss, in
    float32: every config with every option set (C++; under the Triton interpreter one mask
    and two option sets)."""
    start, width = sum(widths[:rank]), widths[rank]
    for backend in backends_for("cpu"):
        sweep = backend == "cpp"
        for config in CONFIGS:
            sets = list(option_sets(config).items())
            sets = [("plain", {})] + (sets if sweep else sets[-1:])
            for mask_id in masks if sweep else masks[-1:]:
                for name, opts in sets:
                    for reduction in ("mean", "none") if sweep else ("none",):
                        z, target, kw = build(config, opts, n=9, v=VOCAB, k=4,
                                              seed=mask_id or 0, mask_id=mask_id)
                        kw["reduction"] = reduction
                        where = f"{backend} {config} {name} mask={mask_id} {reduction} rank={rank}"
                        _check_case(start, width, where, z, target, kw, _single_process_fused,
                                    dict(backend=backend), dict(rtol=2e-5, atol=2e-5),
                                    dict(rtol=1e-4, atol=2e-6))


def _fused_linear_and_bf16_checks(rank, widths):
    """The column-split head through the fused shard pass (its logits overwritten by their
    gradient) against fused_linear_tcsm_loss; bfloat16 logits against the single-process op."""
    start, width = sum(widths[:rank]), widths[rank]
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(12, 6, generator=g)
    head = torch.randn(VOCAB, 6, generator=g)
    target = torch.randint(0, VOCAB, (12,), generator=g)
    target[target == 4] = 5
    kw = dict(divergence="gkl", mask_id=4, lse_square_scale=0.01)
    h1, w1 = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    fused_linear_tcsm_loss(h1, w1, target, **kw).backward()
    want = fused_linear_tcsm_loss(hidden, head, target, **kw)
    h2 = hidden.clone().requires_grad_()
    w2 = head[start:start + width].clone().requires_grad_()
    got = vocab_parallel_linear_tcsm_loss(h2, w2, target, vocab_start=start, vocab_size=VOCAB,
                                          **kw)
    got.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w2.grad, w1.grad[start:start + width], rtol=1e-4, atol=1e-5)

    z = (3 * torch.randn(10, VOCAB, generator=g)).bfloat16()
    target = torch.randint(0, VOCAB, (10,), generator=g)
    zf = z.clone().requires_grad_()
    _single_process_fused(zf, target, divergence="is").backward()
    zs = _shard(z, start, width).clone().requires_grad_()
    vocab_parallel_tcsm_loss(zs, target, vocab_start=start, vocab_size=VOCAB,
                             divergence="is").backward()
    assert zs.grad.dtype == torch.bfloat16
    torch.testing.assert_close(zs.grad.float(), _shard(zf.grad, start, width).float(),
                               rtol=2e-2, atol=1e-3)


def _linear_check(rank, widths):
    start, width = sum(widths[:rank]), widths[rank]
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(12, 6, generator=g, dtype=torch.float64)
    head = torch.randn(VOCAB, 6, generator=g, dtype=torch.float64)
    target = torch.randint(0, VOCAB, (12,), generator=g)
    h1, w1 = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    want = fused_tcsm_loss(h1 @ w1.T, target, divergence="gkl", backend="reference")
    want.backward()
    h2 = hidden.clone().requires_grad_()
    w2 = head[start:start + width].clone().requires_grad_()
    got = vocab_parallel_linear_tcsm_loss(h2, w2, target, vocab_start=start, vocab_size=VOCAB,
                                          divergence="gkl")
    got.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(h2.grad, h1.grad)
    torch.testing.assert_close(w2.grad, w1.grad[start:start + width])


def _step_checks(rank, widths, masks):
    start, width = sum(widths[:rank]), widths[rank]
    for mask_id in masks:
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            z = 2 * torch.randn(300, VOCAB, generator=g)
            x = torch.randint(0, VOCAB, (300,), generator=g)
            if mask_id is not None:
                x[::2] = mask_id
            jump = torch.rand(300, generator=g, dtype=torch.float64)
            frozen = torch.rand(300, generator=g) < 0.1
            kw = dict(mask_id=mask_id, temperature=0.8, frozen=frozen, seed=seed, offset=5,
                      return_x1=True, return_confidence=True)
            want = reference.ctmc_step(z, x, jump, **kw)
            got = vocab_parallel_ctmc_step(_shard(z, start, width), x, jump, vocab_start=start,
                                           vocab_size=VOCAB, **kw)
            assert isinstance(got, StepOutput)
            where = f"step mask={mask_id} seed={seed} rank={rank}"
            assert torch.equal(got.x1, want.x1), where
            assert torch.equal(got.x, want.x), where
            for name in ("prob", "margin", "entropy"):
                torch.testing.assert_close(getattr(got, name), getattr(want, name), msg=where)


def _bad_input_checks(rank, widths):
    start, width = sum(widths[:rank]), widths[rank]
    z = torch.randn(4, VOCAB, dtype=torch.float64)
    target = torch.randint(0, VOCAB, (4,))
    bad_target = target.clone()
    if rank == 1:
        bad_target[0] = VOCAB  # out of range on rank 1 only
    cases = [
        (dict(logits_shard=_shard(z, start, width), target=bad_target, vocab_start=start,
              vocab_size=VOCAB), "rank 1"),
        (dict(logits_shard=_shard(z, start, width), target=target,
              vocab_start=start - (rank == 1), vocab_size=VOCAB), "overlaps"),
        (dict(logits_shard=_shard(z, start, width), target=target, vocab_start=start,
              vocab_size=VOCAB + 1), "cover"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ShardError, match=match):
            vocab_parallel_tcsm_loss(**kwargs)
    with pytest.raises(ShardError, match="rank 1"):
        vocab_parallel_ctmc_step(_shard(z, start, width), bad_target, torch.ones(4),
                                 vocab_start=start, vocab_size=VOCAB)
    # still in step after the refusals: a good call goes through
    vocab_parallel_tcsm_loss(_shard(z, start, width), target, vocab_start=start,
                             vocab_size=VOCAB)


def _worker(rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        widths, masks = LAYOUTS[world]
        _bad_input_checks(rank, widths)
        _loss_checks(rank, widths, masks)
        _fused_loss_checks(rank, widths, masks)
        _fused_linear_and_bf16_checks(rank, widths)
        _linear_check(rank, widths)
        _step_checks(rank, widths, masks)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_vocab_parallel_ops_match_the_single_process_ops(world):
    mp.spawn(_worker, args=(world, _free_port()), nprocs=world, join=True)


def test_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_tcsm_loss(torch.randn(2, 3), torch.zeros(2, dtype=torch.long),
                                 vocab_start=0, vocab_size=3)
