"""The vocabulary-parallel loss's row kernels (csrc/shard_rows.h): C++ and the Triton interpreter
against the definitions in plain PyTorch (float64), with a mask column, banned (-inf) columns,
an all-banned row, a softcap, column weights, excluded ids, a dense teacher, and bf16/fp16
storage; the gradient written over the logits (in place) equals the out-of-place one."""
import pytest
import torch

from tcsm_kernels import _backend
from tcsm_kernels.triton import shard_rows

from .conftest import HAS_CUDA, backends_for

BACKENDS = backends_for("cpu")


def _on(device, args):
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def _expected_stats(x, teacher, column, excluded, mask_col, tau, softcap):
    z = x.double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    n, w = z.shape
    keep = torch.ones(w, dtype=torch.bool)
    if mask_col >= 0:
        keep[mask_col] = False
    z = z.masked_fill(~keep, float("-inf"))

    def shifted(m):
        return torch.where(torch.isfinite(m), m, torch.zeros_like(m))

    m = z.amax(1)
    s = shifted(m)
    out = torch.zeros(n, 6, dtype=torch.float64)
    out[:, 0], out[:, 1] = m, torch.exp(z - s[:, None]).sum(1)
    if teacher is not None:
        u = (teacher.double() / tau).masked_fill(~keep, float("-inf"))
        mu = u.amax(1)
        eu = torch.exp(u - shifted(mu)[:, None])
        out[:, 2], out[:, 3] = mu, eu.sum(1)
        out[:, 4] = torch.where(eu > 0, eu * (u - z), 0).sum(1)
        out[:, 5] = torch.where(keep, u - z, 0).sum(1)
        return out
    c = torch.ones(w, dtype=torch.float64) if column is None else column.double()
    out[:, 2] = torch.where(keep, c * (z - s[:, None]), 0).sum(1)
    rest = keep.expand(n, w).clone()
    if excluded is not None:
        for i in range(n):
            for j in excluded[i].tolist():
                if j >= 0:
                    rest[i, j] = False
    zr = z.masked_fill(~rest, float("-inf"))
    mr = zr.amax(1)
    out[:, 3], out[:, 4] = mr, torch.exp(zr - shifted(mr)[:, None]).sum(1)
    return out


def _capped(x, softcap):
    z = x.double()
    return softcap * torch.tanh(z / softcap) if softcap else z


def _expected_ratio_sums(x, teacher, delta, mask_col, tau, softcap, limit):
    r = teacher.double() / tau - _capped(x, softcap) - delta.double()[:, None]
    e = torch.exp(r.clamp(max=limit))
    if mask_col >= 0:
        e[:, mask_col] = 0
    return e.sum(1)


def _expected_grad(x, teacher, column, excluded, lse, alpha, beta, teacher_lse, gamma, rest_lse,
                   eta, delta, kappa, mask_col, tau, softcap, limit):
    z = x.double()
    slope = torch.ones_like(z)
    if softcap:
        t = torch.tanh(z / softcap)
        z, slope = softcap * t, 1 - t * t
    p = torch.exp(z - lse.double()[:, None])
    if teacher is not None:
        c = torch.exp(teacher.double() / tau - teacher_lse.double()[:, None])
    elif column is not None:
        c = column.double().expand_as(z)
    else:
        c = torch.ones_like(z)
    g = alpha.double()[:, None] * p + beta.double()[:, None] * c
    if eta is not None:
        r = (teacher.double() / tau - z - delta.double()[:, None]).clamp(max=limit)
        g = g + eta.double()[:, None] * torch.exp(r) + kappa.double()[:, None]
    if excluded is not None:
        off_s = torch.ones_like(z, dtype=torch.bool)
        for i, ids in enumerate(excluded.tolist()):
            off_s[i, [j for j in ids if j >= 0]] = False
        rest = torch.exp(z - rest_lse.double()[:, None])
        g = g + torch.where(off_s, gamma.double()[:, None] * rest, 0)
    g = g * slope
    if mask_col >= 0:
        g[:, mask_col] = 0
    return g


def _run_ratio_sums(backend, *args):
    if backend == "cpp":
        return torch.ops.tcsm.shard_ratio_sums_cpu(*args)
    return shard_rows.ratio_sums(*_on("cuda" if HAS_CUDA else "cpu", args)).cpu()


def _run_stats(backend, *args):
    if backend == "cpp":
        return torch.ops.tcsm.shard_row_stats_cpu(*args)
    return shard_rows.row_stats(*_on("cuda" if HAS_CUDA else "cpu", args)).cpu()


def _run_grad(backend, *args):
    if backend == "cpp":
        torch.ops.tcsm.shard_row_grad_cpu(*args)
        return
    moved = _on("cuda" if HAS_CUDA else "cpu", args)
    shard_rows.row_grad(*moved)
    args[13].copy_(moved[13].cpu())


CASES = [
    dict(),
    dict(mask_col=3),
    dict(softcap=2.0, mask_col=0),
    dict(column=True),
    dict(excluded=True, mask_col=5),
    dict(teacher=True, tau=0.7),
    dict(teacher=True, softcap=3.0, mask_col=6),
    dict(teacher=True, ratio=True, tau=0.8, limit=2.0),
    dict(teacher=True, ratio=True, softcap=3.0, mask_col=1, limit=30.0),
]


def _inputs(case, dtype, n=7, w=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (4 * torch.randn(n, w, generator=g)).to(dtype)
    x[1, ::3] = float("-inf")  # banned columns
    x[2] = float("-inf")  # an all-banned row
    teacher = (3 * torch.randn(n, w, generator=g)).to(dtype) if case.get("teacher") else None
    if teacher is not None:
        teacher[3, 10:50] = float("-inf")  # zero teacher probabilities
    column = torch.rand(w, generator=g) + 0.1 if case.get("column") else None
    excluded = None
    if case.get("excluded"):
        excluded = torch.stack([torch.randperm(w, generator=g)[:6] for _ in range(n)])
        excluded[:, -2:] = -1  # ids another rank owns
    return x, teacher, column, excluded


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_row_kernels_match_their_definitions(backend, dtype, case):
    if backend == "triton" and dtype != torch.float32 and case.get("teacher"):
        pytest.skip("one dtype sweep of the teacher kernels is enough under the interpreter")
    x, teacher, column, excluded = _inputs(case, dtype)
    mask_col, tau, softcap = case.get("mask_col", -1), case.get("tau", 1.0), case.get("softcap", 0.0)
    stats = _run_stats(backend, x, teacher, column, excluded, mask_col, tau, softcap)
    want = _expected_stats(x, teacher, column, excluded, mask_col, tau, softcap)
    torch.testing.assert_close(stats.double(), want, rtol=2e-5, atol=1e-4, equal_nan=True)

    g = torch.Generator().manual_seed(1)
    n = x.shape[0]
    lse = (torch.logsumexp(x.float(), 1) + 0.3).clamp(min=-1e30)
    alpha, beta = torch.randn(n, generator=g), torch.randn(n, generator=g)
    teacher_lse = None if teacher is None else torch.logsumexp(teacher.float() / tau, 1)
    gamma = rest_lse = None
    if excluded is not None:
        gamma, rest_lse = torch.randn(n, generator=g), lse - 2.0
        gamma[2] = rest_lse[2] = 0
    eta = delta = kappa = None
    limit = case.get("limit", 30.0)
    if case.get("ratio"):
        eta, kappa = torch.randn(n, generator=g), torch.randn(n, generator=g)
        delta = torch.randn(n, generator=g)
        eta[2] = kappa[2] = 0
        sums = _run_ratio_sums(backend, x, teacher, delta, mask_col, tau, softcap, limit)
        want = _expected_ratio_sums(x, teacher, delta, mask_col, tau, softcap, limit)
        torch.testing.assert_close(sums.double(), want, rtol=2e-5, atol=1e-5)
    alpha[2] = beta[2] = 0  # the all-banned row carries no loss
    coefficients = (lse, alpha, beta, teacher_lse, gamma, rest_lse, eta, delta, kappa)
    grad = torch.empty_like(x)
    _run_grad(backend, x, teacher, column, excluded, *coefficients, grad, mask_col, tau, softcap,
              limit)
    want = _expected_grad(x, teacher, column, excluded, *coefficients, mask_col, tau, softcap,
                          limit)
    want[2] = 0
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(grad.double(), want, **tol)
    # in place: the gradient written over the logits
    inplace = x.clone()
    _run_grad(backend, inplace, teacher, column, excluded, *coefficients, inplace, mask_col,
              tau, softcap, limit)
    assert torch.equal(inplace, grad)


@pytest.mark.skipif(not _backend.cpp_available(), reason="needs the C++ extension")
def test_cpp_row_kernels_reject_bad_shapes():
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="excluded must be"):
        torch.ops.tcsm.shard_row_stats_cpu(x, None, None, torch.zeros(2, 2, dtype=torch.long),
                                           -1, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="mask_col"):
        torch.ops.tcsm.shard_row_stats_cpu(x, None, None, None, 8, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="column_weight"):
        torch.ops.tcsm.shard_row_stats_cpu(x, None, torch.ones(7), None, -1, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="alpha"):
        torch.ops.tcsm.shard_row_grad_cpu(x, None, None, None, torch.zeros(3), torch.zeros(2),
                                          torch.zeros(3), None, None, None, None, None, None,
                                          torch.empty_like(x), -1, 1.0, 0.0, 30.0)
    with pytest.raises(RuntimeError, match="go together"):
        torch.ops.tcsm.shard_row_grad_cpu(x, None, None, None, torch.zeros(3), torch.zeros(3),
                                          torch.zeros(3), None, torch.zeros(3), None, None, None,
                                          None, torch.empty_like(x), -1, 1.0, 0.0, 30.0)
    with pytest.raises(RuntimeError, match="with teacher_logits"):
        torch.ops.tcsm.shard_row_grad_cpu(x, None, None, None, torch.zeros(3), torch.zeros(3),
                                          torch.zeros(3), None, None, None, torch.zeros(3),
                                          torch.zeros(3), torch.zeros(3), torch.empty_like(x),
                                          -1, 1.0, 0.0, 30.0)
