"""The loss options (softcap, z-loss / return_lse, label_smoothing, class_weight, out_dtype):
three-way agreement over every case of LOSS_CASES that defines them, float64 gradcheck, the
peers' formulas (torch's F.cross_entropy, Liger's z-loss and softcap), the fused-linear path,
and the refusals."""
import pytest
import torch
import torch.nn.functional as F

from tcsm_kernels import (LOSS_CASES, LossOutput, fused_linear_tcsm_loss, fused_tcsm_loss,
                          reference)
from tcsm_kernels.loss_options import LossOptions

from .conftest import backends_for
from .test_reference import CONFIGS, make_case

BACKENDS = backends_for("cpu")
TARGET_KIND = {None: "data", "dense": "dense", "sparse": "topk", "topk": "topk"}


def case_of(config):
    options = LossOptions(**{k: v for k, v in config.items() if k != "teacher"})
    return options.case(TARGET_KIND[config.get("teacher")])


def option_sets(config):
    """Named option sets the table defines for this config (read from LOSS_CASES)."""
    case = case_of(config)
    sets = {"softcap": dict(softcap=2.5)}
    if config.get("divergence", "kl") in case.lse_divergences:
        sets["zloss"] = dict(lse_square_scale=0.05, return_lse=True)
        sets["softcap+zloss"] = dict(softcap=3.0, lse_square_scale=0.1, return_lse=True)
    if config.get("divergence", "kl") in case.smoothing_divergences:
        sets["smoothing"] = dict(label_smoothing=0.2)
    if case.class_weight:
        sets["class_weight"] = dict(class_weight=True)
        if "smoothing" in sets:
            sets["all"] = dict(softcap=3.0, lse_square_scale=0.1, return_lse=True,
                               label_smoothing=0.15, class_weight=True)
    return sets


GRID = [(config, name, opts) for config in CONFIGS for name, opts in option_sets(config).items()]
GRID_IDS = [f"{config}-{name}" for config, name, _ in GRID]


def test_grid_covers_every_option_of_the_table():
    """Each case of the table that defines an option appears in the grid with it."""
    seen = {(TARGET_KIND[c.get("teacher")], c.get("divergence", "kl"), name)
            for c, name, _ in GRID}
    for case in LOSS_CASES:
        for d in case.lse_divergences:
            assert (case.target, d, "zloss") in seen, (case, d)
        for d in case.smoothing_divergences:
            assert (case.target, d, "smoothing") in seen, (case, d)
        if case.class_weight:
            assert any(t == case.target and n == "class_weight" for t, _, n in seen)


def build(config, opts, n=23, v=29, k=4, seed=3, mask_id=3):
    """Inputs with large logits (the softcap bends them), ignored rows and row weights."""
    z, target, kw = make_case(config, n=n, v=v, k=k, seed=seed, mask_id=mask_id)
    z = 4 * z
    target[::6] = -100
    g = torch.Generator().manual_seed(seed + 1)
    kw.update(mask_id=mask_id, weight=torch.rand(n, generator=g) + 0.5)
    opts = dict(opts)
    if opts.pop("class_weight", False):
        kw["class_weight"] = torch.rand(v, generator=g) + 0.25
    kw.update(opts)
    return z, target, kw


def as_tuple(out):
    if isinstance(out, LossOutput):
        return out.loss, out.lse, out.z_loss
    return (out,)


def run(fn, z, target, kw, device="cpu", dtype=None):
    moved = {}
    for key, value in kw.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if value.is_floating_point() and dtype is not None and key != "teacher_topk":
                value = value.to(dtype)
        elif isinstance(value, tuple):
            value = tuple(t.to(device) for t in value)
        moved[key] = value
    zz = z.to(device, dtype or z.dtype).detach().requires_grad_()
    outs = as_tuple(fn(zz, target.to(device), **moved))
    outs[0].backward()
    return [o.detach().cpu().double() for o in outs], zz.grad.cpu().double()


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config,name,opts", GRID, ids=GRID_IDS)
def test_options_agree_with_reference(config, name, opts, backend, reduction, request):
    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    z, target, kw = build(config, opts)
    kw["reduction"] = reduction
    if reduction == "none":  # a sum of the rows is what backward sees
        def fused(z_, t_, **k):
            out = fused_tcsm_loss(z_, t_, **k)
            return LossOutput(out.loss.sum(), out.lse, out.z_loss) if isinstance(
                out, LossOutput) else out.sum()
        ref_fn = lambda z_, t_, **k: fused(z_, t_, backend="reference", **k)  # noqa: E731
        fused_fn = lambda z_, t_, **k: fused(z_, t_, backend=backend, **k)  # noqa: E731
    else:
        ref_fn = lambda z_, t_, **k: reference.tcsm_loss(z_, t_, **k)  # noqa: E731
        fused_fn = lambda z_, t_, **k: fused_tcsm_loss(z_, t_, backend=backend, **k)  # noqa: E731
    want, want_grad = run(ref_fn, z, target, kw, dtype=torch.float64)
    got, got_grad = run(fused_fn, z, target, kw, device=device)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=3e-5, atol=3e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=3e-4, atol=3e-6)


@pytest.mark.parametrize("config,name,opts", GRID, ids=GRID_IDS)
def test_options_gradcheck_float64(config, name, opts):
    z, target, kw = build(config, opts, n=5, v=7, k=3, mask_id=None)
    z = (z / 2).double().requires_grad_()
    for key in ("weight", "class_weight", "teacher_logits"):
        if key in kw:
            kw[key] = kw[key].double()
    assert torch.autograd.gradcheck(
        lambda z_: as_tuple(reference.tcsm_loss(z_, target, **kw))[0], (z,))


# ---- the peers' definitions ------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_label_smoothing_and_class_weight_are_torch_cross_entropy(backend, reduction, smoothing,
                                                                   request):
    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(40, 33, generator=g)
    target = torch.randint(0, 33, (40,), generator=g)
    target[::7] = -100
    class_weight = torch.rand(33, generator=g) + 0.1
    want = F.cross_entropy(z.double(), target, weight=class_weight.double(),
                           label_smoothing=smoothing, reduction=reduction)
    zz = z.to(device).detach().requires_grad_()
    got = fused_tcsm_loss(zz, target.to(device), class_weight=class_weight.to(device),
                          label_smoothing=smoothing, reduction=reduction, backend=backend)
    torch.testing.assert_close(got.cpu().double(), want, rtol=2e-5, atol=2e-6)
    zd = z.double().requires_grad_()
    F.cross_entropy(zd, target, weight=class_weight.double(), label_smoothing=smoothing,
                    reduction=reduction).sum().backward()
    got.sum().backward()
    torch.testing.assert_close(zz.grad.cpu().double(), zd.grad, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_softcap_and_z_loss_are_liger_definitions(backend, request):
    """Liger: loss = CE(c tanh(z / c)) + s LSE(c tanh(z / c))^2 per row, mean over the
    non-ignored rows; return_lse gives that LSE and z_loss the s LSE^2 part."""
    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    g = torch.Generator().manual_seed(1)
    z = 20 * torch.randn(30, 50, generator=g)
    target = torch.randint(0, 50, (30,), generator=g)
    target[3] = -100
    cap, s = 15.0, 1e-3
    zd = z.double().requires_grad_()
    capped = cap * torch.tanh(zd / cap)
    lse = torch.logsumexp(capped, 1)
    keep = target != -100
    z_part = (s * lse ** 2)[keep].sum() / keep.sum()
    want = F.cross_entropy(capped, target) + z_part
    want.backward()
    zz = z.to(device).detach().requires_grad_()
    out = fused_tcsm_loss(zz, target.to(device), softcap=cap, lse_square_scale=s,
                          return_lse=True, backend=backend)
    out.loss.backward()
    torch.testing.assert_close(out.loss.cpu().double(), want.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(out.z_loss.cpu().double(), z_part.detach(), rtol=2e-5,
                               atol=2e-7)
    torch.testing.assert_close(out.lse.cpu().double(), torch.where(keep, lse, 0).detach(),
                               rtol=2e-6, atol=2e-5)
    torch.testing.assert_close(zz.grad.cpu().double(), zd.grad, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("out_dtype", [None, torch.float64, torch.bfloat16])
def test_out_dtype(out_dtype):
    z = torch.randn(6, 9)
    target = torch.randint(0, 9, (6,))
    loss = fused_tcsm_loss(z, target, out_dtype=out_dtype)
    assert loss.dtype == (out_dtype or torch.float32)
    torch.testing.assert_close(loss.double(), F.cross_entropy(z.double(), target),
                               rtol=1e-2 if out_dtype == torch.bfloat16 else 1e-5, atol=0)


# ---- the fused-linear path -------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("teacher", [None, "dense", "topk"])
def test_fused_linear_takes_the_options(backend, teacher, request):
    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    g = torch.Generator().manual_seed(2)
    n, d, v = 19, 8, 27
    hidden = torch.randn(n, d, generator=g)
    head = torch.randn(v, d, generator=g)
    target = torch.randint(1, v, (n,), generator=g)
    target[::5] = -100
    kw = dict(mask_id=0, softcap=4.0, lse_square_scale=0.02, return_lse=True)
    if teacher is None:
        kw.update(class_weight=torch.rand(v, generator=g) + 0.5, label_smoothing=0.1)
    elif teacher == "dense":
        kw["teacher_logits"] = torch.randn(n, v, generator=g)
    else:
        _, _, topk = make_case(dict(teacher="topk"), n=n, v=v, k=4, seed=5, mask_id=0)
        kw["teacher_topk"] = topk["teacher_topk"]
    kw = {k: (tuple(t.to(device) for t in x) if isinstance(x, tuple)
              else x.to(device) if isinstance(x, torch.Tensor) else x) for k, x in kw.items()}
    h1, w1 = hidden.to(device).requires_grad_(), head.to(device).requires_grad_()
    want = fused_tcsm_loss(h1 @ w1.T, target.to(device), backend="reference", **kw)
    want.loss.backward()
    h2, w2 = hidden.to(device).requires_grad_(), head.to(device).requires_grad_()
    got = fused_linear_tcsm_loss(h2, w2, target.to(device), backend=backend, chunk_rows=6, **kw)
    got.loss.backward()
    for a, b in ((got.loss, want.loss), (got.lse, want.lse), (got.z_loss, want.z_loss),
                 (h2.grad, h1.grad), (w2.grad, w1.grad)):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=2e-4, atol=2e-5)


# ---- refusals --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,config,match", [
    (dict(label_smoothing=0.1), dict(divergence="gkl"), "label_smoothing"),
    (dict(label_smoothing=0.1), dict(divergence="kl", teacher="dense"), "label_smoothing"),
    (dict(class_weight=True), dict(divergence="kl", teacher="dense"), "class_weight"),
    (dict(return_lse=True), dict(divergence="is", objective="score", teacher="dense"),
     "return_lse"),
    (dict(lse_square_scale=0.1), dict(divergence="gkl", objective="score", teacher="sparse",
                                      tail="ignore"), "lse_square_scale"),
    (dict(softcap=0.0), dict(divergence="kl"), "softcap"),
    (dict(softcap=-1.0), dict(divergence="kl"), "softcap"),
    (dict(label_smoothing=1.5), dict(divergence="kl"), "label_smoothing"),
    (dict(lse_square_scale=-0.1), dict(divergence="kl"), "lse_square_scale"),
])
def test_options_refused_where_the_table_does_not_define_them(kwargs, config, match):
    z, target, kw = make_case(config, n=4, v=6)
    if kwargs.pop("class_weight", False):
        kwargs["class_weight"] = torch.ones(6)
    for fn in (fused_tcsm_loss, reference.tcsm_loss):
        with pytest.raises(ValueError, match=match):
            fn(z, target, **kw, **kwargs)


def test_class_weight_shape_is_checked():
    z, target = torch.randn(4, 6), torch.randint(0, 6, (4,))
    with pytest.raises((ValueError, TypeError), match="class_weight"):
        fused_tcsm_loss(z, target, class_weight=torch.ones(5))
