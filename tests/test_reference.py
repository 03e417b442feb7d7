"""The reference against brute force over explicit ratio vectors (docs/math.md 3), float64
gradcheck, the Proposition 3 identity and property tests."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tcsm_kernels import reference

from ._topk_cases import topk_distribution



@pytest.fixture(autouse=True)
def float64_default():
    """Brute-force comparisons run in float64; restore the default for other modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def gkl(a, b):
    """Generalized KL over positive vectors; 0 log 0 = 0."""
    return (torch.where(a > 0, a * torch.log(a / b), 0) - a + b).sum(-1)


def itakura_saito(a, b):
    return (a / b - torch.log(a / b) - 1).sum(-1)


def one_row(z, **kw):
    return reference.tcsm_loss(z[None], torch.tensor([kw.pop("a", 0)]), reduction="sum", **kw)


@pytest.fixture
def row():
    g = torch.Generator().manual_seed(0)
    v = 9
    return torch.randn(v, generator=g), torch.randn(v, generator=g), 4


def test_dense_distrib_matches_explicit_divergences(row):
    z, u, a = row
    p, q = z.softmax(0), u.softmax(0)
    v = z.numel()
    kl = (q * (q / p).log()).sum()
    is_ = itakura_saito(q, p) / v
    common = dict(teacher_logits=u[None], objective="distrib", a=a)
    assert torch.allclose(one_row(z, divergence="kl", **common), kl)
    assert torch.allclose(one_row(z, divergence="is", **common), is_)
    assert torch.allclose(one_row(z, divergence="gkl", **common), kl + is_)


def test_dense_score_matches_explicit_ratio_vectors(row):
    z, u, a = row
    p, q = z.softmax(0), u.softmax(0)
    v = z.numel()
    common = dict(teacher_logits=u[None], objective="score", a=a)
    assert torch.allclose(one_row(z, divergence="gkl", **common), gkl(q / q[a], p / p[a]) / v)
    assert torch.allclose(one_row(z, divergence="is", **common),
                          itakura_saito(q / q[a], p / p[a]) / v)


def test_proposition_3(row):
    z, u, _ = row
    p, q = z.softmax(0), u.softmax(0)
    v = z.numel()
    expected = sum(q[a] * gkl(q / q[a], p / p[a]) for a in range(v))
    kl = (q * (q / p).log()).sum()
    assert torch.allclose(expected, v * kl + itakura_saito(q, p))
    # and with the 1/V normalisation, term by term: gkl = kl + is for the loss op
    score = sum(q[a] * one_row(z, teacher_logits=u[None], objective="score", divergence="gkl", a=a)
                for a in range(v))
    distrib = one_row(z, teacher_logits=u[None], objective="distrib", divergence="gkl")
    assert torch.allclose(score, distrib)


@pytest.mark.parametrize("divergence", ["kl", "is", "gkl"])
def test_data_target_is_unbiased_in_gradient(row, divergence):
    """E_{a ~ q} grad data-loss(a) equals grad of the dense distributional loss (math.md 4.1)."""
    z, u, _ = row
    q = u.softmax(0)
    z = z.clone().requires_grad_()
    expected = sum(q[a] * one_row(z, divergence=divergence, a=a) for a in range(z.numel()))
    (g_data,) = torch.autograd.grad(expected, z)
    distrib = one_row(z, teacher_logits=u[None], divergence=divergence, objective="distrib")
    (g_distrib,) = torch.autograd.grad(distrib, z)
    assert torch.allclose(g_data, g_distrib, atol=1e-12)


@pytest.mark.parametrize("tail", ["zero", "ignore"])
def test_sparse_matches_explicit_ratio_vectors(row, tail):
    z, u, a = row
    v = z.numel()
    idx = torch.tensor([0, a, 7, 2])  # includes the reference token, which is skipped
    rho = torch.tensor([0.3, 1.0, -0.5, 2.0])
    b = (z - z[a]).exp()
    big_a = torch.zeros(v)
    counted = idx != a
    big_a[idx[counted]] = rho[counted].exp()
    others = torch.arange(v) != a
    if tail == "zero":
        expected = gkl(big_a[others], b[others]) / v
    else:
        s = idx[counted]
        expected = gkl(big_a[s], b[s]) / v
    got = one_row(z, teacher_topk=(idx[None], rho[None]), divergence="gkl", objective="score",
                  tail=tail, a=a)
    assert torch.allclose(got, expected)
    s = idx[counted]
    got_is = one_row(z, teacher_topk=(idx[None], rho[None]), divergence="is", objective="score",
                     a=a)
    assert torch.allclose(got_is, itakura_saito(big_a[s], b[s]) / v)


def test_data_target_formulas(row):
    z, _, a = row
    v = z.numel()
    lse = z.logsumexp(0)
    assert torch.allclose(one_row(z, divergence="kl", a=a), lse - z[a])
    assert torch.allclose(one_row(z, divergence="gkl", a=a), z.mean() - z[a] + (lse - z[a]).exp() / v)


def test_mask_id_is_excluded(row):
    z, u, a = row
    mask_id = 6
    keep = torch.arange(z.numel()) != mask_id
    for kw in (dict(divergence="gkl"), dict(teacher_logits=u[None], divergence="gkl"),
               dict(teacher_logits=u[None], divergence="is", objective="score")):
        full = dict(kw)
        if "teacher_logits" in kw:
            kw = dict(kw, teacher_logits=u[keep][None])
        got = one_row(z, mask_id=mask_id, a=a, **full)
        assert torch.allclose(got, one_row(z[keep], a=a, **kw))


CONFIGS = [
    dict(divergence=d) for d in ("kl", "is", "gkl")
] + [
    dict(divergence=d, objective="distrib", teacher="dense") for d in ("kl", "is", "gkl")
] + [
    dict(divergence=d, objective="score", teacher="dense") for d in ("is", "gkl")
] + [
    dict(divergence="gkl", objective="score", teacher="sparse", tail="zero"),
    dict(divergence="gkl", objective="score", teacher="sparse", tail="ignore"),
    dict(divergence="is", objective="score", teacher="sparse"),
] + [
    dict(divergence=d, teacher="topk", tail="zero") for d in ("kl", "is", "gkl")
] + [
    dict(divergence="kl", teacher="topk", tail="renormalize"),
]


def make_case(config, n=5, v=7, k=3, seed=0, mask_id=None):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g)
    target = torch.randint(0, v, (n,), generator=g)
    if mask_id is not None:
        target = torch.where(target == mask_id, (mask_id + 1) % v, target)
    kw = {k_: v_ for k_, v_ in config.items() if k_ != "teacher"}
    if config.get("teacher") == "dense":
        kw["teacher_logits"] = torch.randn(n, v, generator=g)
    elif config.get("teacher") == "sparse":
        idx = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
        kw["teacher_topk"] = (idx, torch.randn(n, k, generator=g))
    elif config.get("teacher") == "topk":
        idx, log_q = topk_distribution(z, k, mask_id, g)
        kw["teacher_topk"] = (idx, log_q.to(z.dtype))
    return z, target, kw


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("mask_id", [None, 3])
def test_gradcheck_float64(config, mask_id):
    z, target, kw = make_case(config, mask_id=mask_id)
    target[1] = -100
    weight = torch.rand(z.shape[0])
    z.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z_: reference.tcsm_loss(z_, target, weight=weight, mask_id=mask_id, **kw), (z,))


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_reductions_weights_and_ignore(config):
    z, target, kw = make_case(config, n=6)
    target[2] = -100
    weight = torch.rand(6)
    rows = reference.tcsm_loss(z, target, weight=weight, reduction="none", **kw)
    assert rows.shape == (6,) and rows[2] == 0
    unweighted = reference.tcsm_loss(z, target, reduction="none", **kw)
    assert torch.allclose(rows, unweighted * weight)
    total = reference.tcsm_loss(z, target, weight=weight, reduction="sum", **kw)
    assert torch.allclose(total, rows.sum())
    mean = reference.tcsm_loss(z, target, weight=weight, reduction="mean", **kw)
    assert torch.allclose(mean, rows.sum() / 5)
    norm = reference.tcsm_loss(z, target, weight=weight, normalizer=8.0, **kw)
    assert torch.allclose(norm, rows.sum() / 8)
    zg = z.clone().requires_grad_()
    reference.tcsm_loss(zg, target, weight=weight, **kw).backward()
    assert torch.all(zg.grad[2] == 0)


def test_all_ignored_and_empty():
    z = torch.randn(3, 5, requires_grad=True)
    target = torch.full((3,), -100)
    loss = reference.tcsm_loss(z, target)
    assert loss.item() == 0
    loss.backward()
    assert torch.all(z.grad == 0)
    empty = reference.tcsm_loss(torch.randn(0, 5), torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0
    assert reference.tcsm_loss(torch.randn(0, 5), torch.zeros(0, dtype=torch.long),
                               reduction="none").shape == (0,)


def test_extreme_logits_stay_finite():
    z = torch.tensor([[1e4, -1e4, 0.0, 5.0]], dtype=torch.float32, requires_grad=True)
    target = torch.tensor([1])
    for kw in (dict(divergence="gkl"), dict(divergence="is"),
               dict(divergence="gkl", teacher_logits=-z.detach(), objective="score")):
        loss = reference.tcsm_loss(z, target, **kw)
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("bad, match", [
    (dict(divergence="kld"), "divergence"),
    (dict(reduction="avg"), "reduction"),
    (dict(tail="one"), "tail"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(mask_id=9), "mask_id"),
    (dict(teacher_logits=torch.randn(2, 4)), "teacher_logits"),
    (dict(teacher_topk=(torch.zeros(3, 6, dtype=torch.long), torch.zeros(3, 6))), "K=6"),
    (dict(teacher_topk=(torch.full((3, 2), 7), torch.zeros(3, 2)), divergence="gkl"), "indices"),
    (dict(weight=torch.ones(4)), "weight"),
    (dict(teacher_logits=torch.randn(3, 5), divergence="kl", objective="score"), "score"),
])
def test_bad_input_names_the_argument(bad, match):
    z = torch.randn(3, 5)
    target = torch.tensor([0, 1, 2])
    with pytest.raises((ValueError, TypeError), match=match):
        reference.tcsm_loss(z, target, **bad)


def test_bad_targets_and_logits():
    z = torch.randn(3, 5)
    with pytest.raises(ValueError, match="target"):
        reference.tcsm_loss(z, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="target"):
        reference.tcsm_loss(z, torch.tensor([0, 2, 1]), mask_id=2)
    with pytest.raises(TypeError, match="target"):
        reference.tcsm_loss(z, torch.tensor([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="logits"):
        reference.tcsm_loss(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]))


# ---- properties --------------------------------------------------------------------------

logit_rows = st.integers(2, 12).flatmap(lambda v: st.tuples(
    st.just(v), st.integers(0, 2**31 - 1), st.floats(-20, 20), st.integers(0, v - 1)))
teacher_configs = [c for c in CONFIGS if "teacher" in c]


@settings(max_examples=40, deadline=None)
@given(case=logit_rows, config=st.sampled_from(CONFIGS))
def test_shift_invariance_and_gradient_rows_sum_to_zero(case, config):
    v, seed, shift, _ = case
    z, target, kw = make_case(config, n=3, v=v, k=min(3, v), seed=seed)
    z.requires_grad_()
    loss = reference.tcsm_loss(z, target, reduction="sum", **kw)
    shifted = reference.tcsm_loss(z + shift, target, reduction="sum", **kw)
    assert torch.allclose(loss, shifted, rtol=1e-9, atol=1e-9)
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.allclose(grad.sum(1), torch.zeros(3), atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(case=logit_rows, config=st.sampled_from(teacher_configs))
def test_teacher_losses_are_nonnegative_and_zero_at_the_target(case, config):
    v, seed, _, _ = case
    z, target, kw = make_case(config, n=3, v=v, k=min(3, v), seed=seed)
    assert (reference.tcsm_loss(z, target, reduction="none", **kw) >= -1e-12).all()
    if config.get("teacher") == "dense":
        kw["teacher_logits"] = z.clone()
    elif config.get("teacher") == "topk":
        # the model's own probabilities on S; renormalize is 0 only when S holds all of p
        idx = kw["teacher_topk"][0]
        if config["tail"] == "renormalize":
            idx = torch.arange(v).expand(3, v)
        kw["teacher_topk"] = (idx, torch.log_softmax(z, 1).gather(1, idx))
    else:  # the model's own ratios on the top-K set; tail 'zero' needs S = all of V
        if config.get("tail", "zero") == "zero" and config["divergence"] == "gkl":
            idx = torch.arange(v).expand(3, v)
        else:
            idx = kw["teacher_topk"][0]
        kw["teacher_topk"] = (idx, z.gather(1, idx) - z.gather(1, target[:, None]))
    at_target = reference.tcsm_loss(z, target, reduction="none", **kw)
    assert torch.allclose(at_target, torch.zeros(3), atol=1e-10)


def test_temperature_divides_teacher_logits(row):
    z, u, a = row
    got = one_row(z, teacher_logits=u[None], divergence="gkl", temperature=2.0, a=a)
    assert torch.allclose(got, one_row(z, teacher_logits=u[None] / 2, divergence="gkl", a=a))


def test_float32_inputs_compute_in_float32():
    z = torch.randn(4, 6, dtype=torch.float32)
    out = reference.tcsm_loss(z, torch.zeros(4, dtype=torch.long), reduction="none")
    assert out.dtype == torch.float32
    for dtype in (torch.bfloat16, torch.float16):
        assert reference.tcsm_loss(z.to(dtype), torch.zeros(4, dtype=torch.long)).dtype == torch.float32


def test_topk_concrete_scores_ties_and_correction():
    u = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    a = torch.tensor([0, 4])
    idx, lr, lse = reference.topk_concrete_scores(u, a, 3, temperature=2.0)
    assert idx.tolist() == [[1, 2, 4], [0, 1, 2]]
    assert torch.allclose(lr[0], torch.tensor([1.0, 1.0, 1.0]))
    assert torch.allclose(lse, torch.logsumexp(u / 2, 1))
    corr = torch.arange(10.0).reshape(2, 5)
    _, lr_v, _ = reference.topk_concrete_scores(u, a, 3, temperature=2.0, correction=corr)
    assert torch.allclose(lr_v, lr + corr.gather(1, idx))
    _, lr_k, _ = reference.topk_concrete_scores(u, a, 3, temperature=2.0, correction=corr[:, :3])
    assert torch.allclose(lr_k, lr + corr[:, :3])
    with pytest.raises(ValueError, match="k must"):
        reference.topk_concrete_scores(u, a, 6)


def test_topk_feeds_the_sparse_loss():
    """Top-K with K = V and tail 'zero' gives the dense score loss exactly."""
    g = torch.Generator().manual_seed(3)
    z, u = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    a = torch.randint(0, 6, (4,), generator=g)
    idx, lr, _ = reference.topk_concrete_scores(u, a, 6)
    sparse = reference.tcsm_loss(z, a, teacher_topk=(idx, lr), divergence="gkl",
                                 objective="score")
    dense = reference.tcsm_loss(z, a, teacher_logits=u, divergence="gkl", objective="score")
    assert torch.allclose(sparse, dense)


@pytest.mark.parametrize("n,v", list(itertools.product([0, 1, 5], [1, 4])))
def test_sizes(n, v):
    z = torch.randn(n, v)
    out = reference.tcsm_loss(z, torch.zeros(n, dtype=torch.long), divergence="gkl",
                              reduction="none")
    assert out.shape == (n,) and torch.isfinite(out).all()
