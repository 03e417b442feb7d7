"""Top-K teacher, distribution objective (docs/math.md 4.5): explicit semantics in float64,
the rest cell's exact pass where the student's mass on S is large or its rest underflows,
three backends, the hand-off from ``topk_log_probs`` and bad input."""
import math

import pytest
import torch

from tcsm_kernels import LOSS_CASES, fused_tcsm_loss, reference, topk_log_probs

from .conftest import backends_for

BACKENDS = backends_for("cpu")


def device_for(backend, request):
    return request.getfixturevalue("triton_device") if backend == "triton" else "cpu"


def kl(q, p):
    return float(sum(qi * math.log(qi / pi) for qi, pi in zip(q, p) if qi > 0))


def itakura_saito(q, p):
    return float(sum(qi / pi - math.log(qi / pi) - 1 for qi, pi in zip(q, p)))


@pytest.fixture
def row():
    g = torch.Generator().manual_seed(0)
    v = 9
    z = torch.randn(v, generator=g, dtype=torch.float64)
    q = torch.softmax(torch.randn(v, generator=g, dtype=torch.float64), 0)
    return z, q, torch.tensor([7, 2, 4, 0])


@pytest.mark.parametrize("divergence", ["kl", "is", "gkl"])
def test_zero_tail_is_the_divergence_on_s_plus_rest(row, divergence):
    """Cells S (the K entries) and R (everything else, one cell of mass 1 - sum)."""
    z, q, idx = row
    p = torch.softmax(z, 0)
    rest = [c for c in range(9) if c not in idx.tolist()]
    q_cells = q[idx].tolist() + [1 - float(q[idx].sum())]
    p_cells = p[idx].tolist() + [float(p[rest].sum())]
    expected = {"kl": kl(q_cells, p_cells), "is": itakura_saito(q_cells, p_cells) / 9}
    expected["gkl"] = expected["kl"] + expected["is"]
    got = reference.tcsm_loss(z[None], torch.tensor([0]), teacher_topk=(idx[None], q[idx].log()[None]),
                              divergence=divergence, reduction="sum")
    assert got.item() == pytest.approx(expected[divergence], rel=1e-12)


def test_renormalize_is_kl_of_q_restricted_to_s(row):
    z, q, idx = row
    p = torch.softmax(z, 0)
    q_s = (q[idx] / q[idx].sum()).tolist()
    got = reference.tcsm_loss(z[None], torch.tensor([0]), teacher_topk=(idx[None], q[idx].log()[None]),
                              tail="renormalize", reduction="sum")
    assert got.item() == pytest.approx(kl(q_s, p[idx].tolist()), rel=1e-12)


def test_mask_entries_are_dropped_and_their_mass_joins_the_rest(row):
    """An entry at mask_id is not counted: the result equals S without it (its mass is part of
    1 - sum_S q), on the student distribution without the mask column."""
    z, q, idx = row
    with_mask = torch.cat([idx, torch.tensor([5])])
    values = torch.cat([q[idx], q[5:6]]).log()
    got = reference.tcsm_loss(z[None], torch.tensor([0]), teacher_topk=(with_mask[None], values[None]),
                              divergence="kl", mask_id=5, reduction="sum")
    keep = [c for c in range(9) if c != 5]
    p = torch.softmax(z[keep], 0)
    position = {c: i for i, c in enumerate(keep)}
    s = [position[c] for c in idx.tolist()]
    rest = [i for i in range(8) if i not in s]
    q_cells = q[idx].tolist() + [1 - float(q[idx].sum())]
    p_cells = p[s].tolist() + [float(p[rest].sum())]
    assert got.item() == pytest.approx(kl(q_cells, p_cells), rel=1e-12)


def test_teacher_without_mass_off_s_counts_only_its_k_cells():
    """q_R = 0 (all the teacher's mass on S): KL unchanged, IS over the K cells alone (finite),
    both zero at the student equal to the teacher."""
    z = torch.tensor([[2.0, 1.0, -1.0, 0.5]], dtype=torch.float64)
    idx = torch.tensor([[0, 1]])
    log_q = torch.tensor([[math.log(0.7), math.log(0.3)]], dtype=torch.float64)
    p = torch.softmax(z[0], 0)
    got = reference.tcsm_loss(z, torch.tensor([0]), teacher_topk=(idx, log_q), divergence="is",
                              reduction="sum")
    assert got.item() == pytest.approx(itakura_saito([0.7, 0.3], p[:2].tolist()) / 4, rel=1e-12)


def test_the_distribution_objective_is_the_dense_one_when_s_is_everything():
    g = torch.Generator().manual_seed(2)
    z, u = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g)
    target = torch.randint(0, 11, (6,), generator=g)
    topk = topk_log_probs(u, 11)
    for divergence in ("kl", "gkl"):
        dense = fused_tcsm_loss(z, target, teacher_logits=u, divergence=divergence)
        # gkl: the K cells alone (q_R = 0) are exactly the dense vocabulary
        sparse = fused_tcsm_loss(z, target, teacher_topk=topk, divergence=divergence)
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    renormalized = fused_tcsm_loss(z, target, teacher_topk=topk, tail="renormalize")
    torch.testing.assert_close(renormalized, fused_tcsm_loss(z, target, teacher_logits=u))


def rest_cases():
    """Student mass on S: small (1 - P_S from the gathers), above 1/2 (the exact rest pass),
    and a rest ~e^-100 below S that float32 block sums flush to 0."""
    g = torch.Generator().manual_seed(4)
    n, v, k = 6, 700, 5
    z = torch.randn(n, v, generator=g)
    u = torch.randn(n, v, generator=g) * 2
    idx = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    log_q = torch.log_softmax(u.double(), 1).gather(1, idx)
    yield "small", z.clone(), idx, log_q
    confident = z.clone()
    confident.scatter_(1, idx, 6.0 + torch.rand(n, k, generator=g))
    yield "above-half", confident, idx, log_q
    underflow = z.clone()
    underflow.scatter_(1, idx, 100.0 + torch.rand(n, k, generator=g))
    yield "underflow", underflow, idx, log_q


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "is", "gkl"])
@pytest.mark.parametrize("name,z,idx,log_q", list(rest_cases()), ids=lambda x: x if isinstance(x, str) else "")
def test_rest_mass_exact_where_it_cancels(backend, divergence, name, z, idx, log_q, request):
    device = device_for(backend, request)
    target = torch.zeros(z.shape[0], dtype=torch.int64)
    kw = dict(divergence=divergence, reduction="none")
    truth_z = z.detach().double().requires_grad_()
    truth = reference.tcsm_loss(truth_z, target, teacher_topk=(idx, log_q), **kw)
    truth.sum().backward()
    got_z = z.detach().clone().to(device).requires_grad_()
    got = fused_tcsm_loss(got_z, target.to(device), teacher_topk=(idx.to(device),
                          log_q.float().to(device)), backend=backend, **kw)
    got.sum().backward()
    assert torch.isfinite(got).all() and torch.isfinite(got_z.grad).all()
    torch.testing.assert_close(got.cpu().double(), truth.detach(), rtol=2e-5, atol=1e-5)
    scale = truth_z.grad.abs().amax(1, keepdim=True)
    err = (got_z.grad.cpu().double() - truth_z.grad).abs().amax(1, keepdim=True)
    assert bool((err <= 2e-5 * scale + 1e-7).all()), (err / scale).max()


def test_topk_log_probs_hands_off_in_one_line():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(3, 4, 50, generator=g)
    u[..., :5] = float("-inf")  # banned columns are fine
    topk = topk_log_probs(u, 7, temperature=0.8)
    expected = torch.log_softmax(u / 0.8, -1).gather(-1, topk.indices)
    torch.testing.assert_close(topk.log_probs, expected)
    assert torch.equal(topk.indices, (u / 0.8).topk(7, dim=-1).indices)
    z = torch.randn(3, 4, 50, generator=g, requires_grad=True)
    loss = fused_tcsm_loss(z, torch.zeros(3, 4, dtype=torch.int64), teacher_topk=topk)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    with pytest.raises(ValueError, match="teacher_logits"):
        topk_log_probs(torch.tensor([[0.0, float("nan"), 1.0]]), 2)


def test_every_case_of_the_table_runs_on_every_backend():
    """The table is what validation accepts: each listed (case, divergence) runs, and each
    divergence not listed for a case is refused with the table's message."""
    g = torch.Generator().manual_seed(0)
    z, u = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    target = torch.randint(0, 9, (4,), generator=g)
    teachers = {"data": {}, "dense": dict(teacher_logits=u),
                "topk": {"distrib": dict(teacher_topk=topk_log_probs(u, 3)),
                         "score": dict(teacher_topk=tuple(reference.topk_concrete_scores(
                             u, target, 3)[:2]))}}
    for case in LOSS_CASES:
        teacher = teachers[case.target]
        teacher = teacher.get(case.objective or "distrib", teacher) if case.target == "topk" else teacher
        options = dict(objective=case.objective or "distrib", tail=case.tail or "zero")
        for divergence in ("kl", "is", "gkl"):
            call = dict(teacher, divergence=divergence, **options)
            if divergence in case.divergences:
                for backend in ["reference"] + [b for b in BACKENDS if b == "cpp"]:
                    assert torch.isfinite(fused_tcsm_loss(z, target, backend=backend, **call))
            else:
                with pytest.raises(ValueError, match="allowed"):
                    fused_tcsm_loss(z, target, **call)


@pytest.mark.parametrize("bad, match", [
    (dict(indices=[[0, 1, 1]]), "repeat"),
    (dict(values=[[-0.1, -0.2, -0.3]]), "sum to"),
    (dict(values=[[float("nan"), -1.0, -2.0]]), "NaN"),
    (dict(values=[[float("-inf")] * 3], tail="renormalize"), "no probability mass"),
    (dict(divergence="is", tail="renormalize"), "allowed"),
    (dict(tail="ignore"), "allowed"),
    (dict(objective="score", tail="renormalize", divergence="gkl"), "allowed"),
    (dict(indices=[[0, 1, 9]]), "indices"),
])
def test_bad_input_names_the_argument(bad, match):
    z = torch.randn(1, 6)
    indices = torch.tensor(bad.pop("indices", [[0, 1, 2]]))
    values = torch.tensor(bad.pop("values", [[-1.0, -2.0, -3.0]]))
    with pytest.raises(ValueError, match=match):
        fused_tcsm_loss(z, torch.tensor([0]), teacher_topk=(indices, values), **bad)
