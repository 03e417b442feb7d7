"""fused_linear_tcsm_loss against fused_tcsm_loss(hidden @ weight.T + bias) and the float64
reference: values and gradients of hidden, weight and bias over the targets, divergences,
reductions (per-row upstream gradients included), chunking, low precision, compile, bad input."""
import pytest
import torch
import torch.nn.functional as F

from tcsm_kernels import (TCSMLinearLoss, fused_linear_tcsm_loss, fused_tcsm_loss, reference,
                          topk_log_probs)
from tcsm_kernels.ops.linear_loss import chunk_row_count

from .conftest import backends_for

BACKENDS = backends_for("cpu")
N, D, DT, V = 29, 12, 6, 41


def device_for(backend, request):
    return request.getfixturevalue("triton_device") if backend == "triton" else "cpu"


def inputs(seed=0, n=N, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, D, generator=g)
    weight = torch.randn(V, D, generator=g) * 0.4
    bias = torch.randn(V, generator=g) * 0.2
    target = torch.randint(1, V, (n,), generator=g)
    target[::7] = -100
    teacher_hidden = torch.randn(n, DT, generator=g)
    teacher_weight = torch.randn(V, DT, generator=g) * 0.5
    return [t.to(dtype) if t.is_floating_point() else t
            for t in (hidden, weight, bias, target, teacher_hidden, teacher_weight)]


TARGETS = {
    "data": lambda th, tw: {},
    "dense": lambda th, tw: dict(teacher_logits=th @ tw.T),
    "head": lambda th, tw: dict(teacher_hidden=th, teacher_weight=tw),
    "topk": lambda th, tw: dict(teacher_topk=tuple(topk_log_probs(th @ tw.T, 5))),
}
GRID = [("data", "kl"), ("data", "gkl"), ("dense", "kl"), ("dense", "is"), ("head", "gkl"),
        ("topk", "kl"), ("topk", "gkl")]


def unfused_reference(hidden, head, bias, target, teacher, **kw):
    """The float64 reference on the materialised logits."""
    if "teacher_hidden" in teacher:
        teacher = dict(teacher_logits=teacher["teacher_hidden"] @ teacher["teacher_weight"].T)
    return reference.tcsm_loss(F.linear(hidden, head, bias), target, **teacher, **kw)


def grads(loss_fn, tensors, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = loss_fn(*leaves)
    loss.backward(upstream)
    return loss.detach(), [leaf.grad for leaf in leaves]


def cast(teacher, dtype, device):
    out = {}
    for key, value in teacher.items():
        if isinstance(value, tuple):
            out[key] = tuple(v.to(device) for v in value)
        else:
            out[key] = value.to(device, dtype if value.is_floating_point() else value.dtype)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,divergence", GRID)
@pytest.mark.parametrize("reduction,mask_id,chunk", [("mean", None, "auto"), ("none", 0, 4),
                                                     ("sum", 5, 1)])
def test_matches_the_unfused_loss(backend, kind, divergence, reduction, mask_id, chunk, request):
    device = device_for(backend, request)
    hidden, weight, bias, target, th, tw = inputs()
    if mask_id is not None:
        target = torch.where(target == mask_id, -100, target)
    teacher = TARGETS[kind](th, tw)
    row_weight = torch.rand(N, generator=torch.Generator().manual_seed(9)) + 0.5
    kw = dict(divergence=divergence, reduction=reduction, mask_id=mask_id,
              temperature=0.8 if kind in ("dense", "head") else 1.0)
    upstream = torch.randn(N) if reduction == "none" else None
    want_loss, want = grads(
        lambda h, w, b: unfused_reference(h, w, b, target, cast(teacher, torch.float64, "cpu"),
                                          weight=row_weight.double(), **kw),
        [t.double() for t in (hidden, weight, bias)],
        None if upstream is None else upstream.double())
    got_loss, got = grads(
        lambda h, w, b: fused_linear_tcsm_loss(h, w, target.to(device), bias=b,
                                               weight_rows=row_weight.to(device),
                                               chunk_rows=chunk, backend=backend,
                                               **cast(teacher, torch.float32, device), **kw),
        [t.to(device) for t in (hidden, weight, bias)],
        None if upstream is None else upstream.to(device))
    torch.testing.assert_close(got_loss.cpu().double(), want_loss, rtol=2e-5, atol=2e-6)
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g.cpu().double(), w, rtol=2e-4, atol=2e-6, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [0, 1, 10])
def test_row_counts_and_no_bias(backend, n, request):
    device = device_for(backend, request)
    hidden, weight, _, target, _, _ = inputs(n=n)
    want_loss, want = grads(lambda h, w: fused_tcsm_loss(F.linear(h, w), target.to(device),
                                                         divergence="gkl", backend=backend),
                            [hidden.to(device), weight.to(device)], None)
    got_loss, got = grads(lambda h, w: fused_linear_tcsm_loss(h, w, target.to(device),
                                                              divergence="gkl", chunk_rows=3,
                                                              backend=backend),
                          [hidden.to(device), weight.to(device)], None)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_the_unfused_path(backend, dtype, request):
    """Against a float64 truth on the same rounded inputs, the fused error is no larger than
    that of the unfused path in the same dtype (F.linear + fused_tcsm_loss) plus a slack."""
    device = device_for(backend, request)
    hidden, weight, bias, target, _, _ = inputs(seed=3, dtype=dtype)
    truth_loss, truth = grads(lambda h, w, b: reference.tcsm_loss(F.linear(h, w, b), target,
                                                                  divergence="gkl"),
                              [t.double() for t in (hidden, weight, bias)], None)
    unfused_loss, unfused = grads(
        lambda h, w, b: fused_tcsm_loss(F.linear(h, w, b), target.to(device), divergence="gkl",
                                        backend=backend),
        [t.to(device) for t in (hidden, weight, bias)], None)
    got_loss, got = grads(
        lambda h, w, b: fused_linear_tcsm_loss(h, w, target.to(device), bias=b,
                                               divergence="gkl", chunk_rows=8, backend=backend),
        [t.to(device) for t in (hidden, weight, bias)], None)
    assert all(g.dtype == dtype for g in got)
    assert abs(got_loss.item() - truth_loss.item()) <= \
        abs(unfused_loss.item() - truth_loss.item()) + 1e-3 * abs(truth_loss.item())
    for name, g, u, t in zip(("hidden", "weight", "bias"), got, unfused, truth):
        err = (g.cpu().double() - t).abs().max()
        base = (u.cpu().double() - t).abs().max()
        ulp = torch.finfo(dtype).eps * t.abs().max()
        assert err <= 1.5 * base + ulp, f"{name}: {err:.3g} vs unfused {base:.3g}"


def test_float64_gradcheck_and_reference_route():
    hidden, weight, bias, target, th, tw = (t.double() if t.is_floating_point() else t
                                            for t in inputs(n=4))
    hidden, weight, bias = (t[:, :3] if t.dim() == 2 else t for t in (hidden, weight, bias))
    hidden.requires_grad_()
    weight.requires_grad_()
    bias.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w, b: fused_linear_tcsm_loss(h, w, target, bias=b, divergence="gkl"),
        (hidden, weight, bias))


def test_torch_compile_fullgraph():
    hidden, weight, bias, target, th, tw = inputs(n=8)
    loss_fn = TCSMLinearLoss(divergence="gkl", chunk_rows=3)
    compiled = torch.compile(lambda h, w, b: loss_fn(h, w, target, bias=b), fullgraph=True,
                             backend="aot_eager")
    got_loss, got = grads(compiled, [hidden, weight, bias], None)
    want_loss, want = grads(lambda h, w, b: fused_tcsm_loss(F.linear(h, w, b), target,
                                                            divergence="gkl"),
                            [hidden, weight, bias], None)
    torch.testing.assert_close(got_loss, want_loss)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert "chunk_rows=3" in repr(loss_fn)


def test_auto_chunk_fits_the_budget():
    assert chunk_row_count("auto", 8192, 128256, torch.float32, False) == 523
    assert chunk_row_count("1MiB", 1000, 1024, torch.float32, True) == 128
    assert chunk_row_count("60KiB", 100, 1024, torch.bfloat16, False) == 10
    assert chunk_row_count(4096, 10, 7, torch.float32, False) == 10


@pytest.mark.parametrize("bad, error, match", [
    (dict(weight=torch.randn(V, D + 1)), ValueError, "D="),
    (dict(bias=torch.randn(V + 1)), ValueError, "bias"),
    (dict(weight=torch.randn(V, D).double()), TypeError, "dtype"),
    (dict(teacher_weight=torch.randn(V + 2, DT)), ValueError, "teacher_weight"),
    (dict(teacher_weight=torch.randn(V, DT), teacher_hidden=None), ValueError, "go together"),
    (dict(chunk_rows=0), ValueError, "chunk_rows"),
    (dict(chunk_rows="lots"), ValueError, "chunk_rows"),
    (dict(weight=torch.randn(V, D, device="meta")), ValueError, "weight"),
    (dict(target=torch.full((N,), V)), ValueError, "target"),
])
def test_bad_input_names_the_argument(bad, error, match):
    hidden, weight, bias, target, th, tw = inputs()
    args = dict(weight=weight, target=target, teacher_hidden=th, teacher_weight=tw)
    if "teacher_weight" not in bad:
        args.update(teacher_hidden=None, teacher_weight=None)
    args.update(bad)
    with pytest.raises(error, match=match):
        fused_linear_tcsm_loss(hidden, args.pop("weight"), args.pop("target"), **args)
