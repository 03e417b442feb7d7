"""Adapters against direct eager transcriptions of the original code bases' formulas."""
import math
import types

import pytest
import torch
import torch.nn.functional as F

from tcsm_kernels.adapters import flow_matching, llada, mdlm
from tcsm_kernels.schedules import LinearSchedule, PolynomialSchedule


B, L, V, MASK = 3, 5, 7, 6


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def leaf_logits(seed=0, shape=(B, L, V)):
    return (1.5 * torch.randn(*shape, generator=gen(seed))).requires_grad_()


def grad_of(loss, logits):
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    return grad


def chi_square_pvalue(counts, probs):
    expected = counts.sum().double() * probs.double()
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((counts.numel() - 1) / 2.0), stat / 2))


# ----------------------------------------------------------------------------- flow_matching

class FlowPath:
    """Stand-in for flow_matching's MixtureDiscreteProbPath(PolynomialConvexScheduler(n))."""

    def __init__(self, n):
        self.n = n

    def scheduler(self, t):
        return types.SimpleNamespace(alpha_t=t ** self.n, d_alpha_t=self.n * t ** (self.n - 1))


def flow_matching_generalized_kl(logits, x_1, x_t, t, path, reduction, jump_coefficient=None):
    """Transcription of flow_matching's MixturePathGeneralizedKL.forward formula."""
    log_p = torch.log_softmax(logits, dim=-1)
    log_p_x1 = log_p.gather(-1, x_1[..., None])[..., 0]
    p_xt = log_p.exp().gather(-1, x_t[..., None])[..., 0]
    if jump_coefficient is None:
        sched = path.scheduler(t)
        jump_coefficient = sched.d_alpha_t / (1 - sched.alpha_t)
    coef = jump_coefficient[:, None]
    delta = (x_t == x_1).to(log_p.dtype)
    loss = -coef * (p_xt - delta + (1 - delta) * log_p_x1)
    return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()


def flow_batch(source):
    x_1 = torch.randint(0, MASK, (B, L), generator=gen(1))
    t = torch.tensor([0.1, 0.5, 0.8])
    keep = torch.rand(B, L, generator=gen(2)) < t[:, None]
    noise = (torch.full_like(x_1, MASK) if source == "mask"
             else torch.randint(0, V, (B, L), generator=gen(3)))
    return x_1, torch.where(keep, x_1, noise), t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_flow_matching_loss_values_and_gradients(reduction, source):
    x_1, x_t, t = flow_batch(source)
    path = FlowPath(2.0)
    logits = leaf_logits()
    ours = flow_matching.MixturePathGeneralizedKL(path, reduction=reduction)(logits, x_1, x_t, t)
    theirs = flow_matching_generalized_kl(logits, x_1, x_t, t, path, reduction)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_of(ours, logits), grad_of(theirs, logits), rtol=1e-5,
                               atol=1e-6)


def test_flow_matching_loss_jump_coefficient_and_schedule_path():
    x_1, x_t, t = flow_batch("uniform")
    logits = leaf_logits(4)
    coef = torch.tensor([0.5, 2.0, 3.0])
    ours = flow_matching.MixturePathGeneralizedKL(PolynomialSchedule(2.0))(
        logits, x_1, x_t, t, jump_coefficient=coef)
    theirs = flow_matching_generalized_kl(logits, x_1, x_t, t, None, "mean", coef)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    wrapped = flow_matching.MixturePathGeneralizedKL(flow_matching.MixturePath(LinearSchedule()))
    torch.testing.assert_close(wrapped(logits, x_1, x_t, t),
                               flow_matching_generalized_kl(logits, x_1, x_t, t, FlowPath(1.0),
                                                            "mean"), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="jump_coefficient"):
        wrapped(logits, x_1, x_t, t, jump_coefficient=coef[:2])
    with pytest.raises(ValueError, match="reduction"):
        flow_matching.MixturePathGeneralizedKL(FlowPath(1.0), reduction="avg")
    with pytest.raises(TypeError, match="path"):
        flow_matching.MixturePathGeneralizedKL(object())


class ProbModel:
    """flow_matching-style model: returns posterior probabilities (B, d, V); records calls."""

    def __init__(self, probs):
        self.probs = probs
        self.times = []

    def __call__(self, x, t, **extras):
        self.times.append((t.clone(), extras))
        return self.probs.expand(x.shape[0], -1, -1)


def one_hot_probs(token, length=L):
    return F.one_hot(torch.full((length,), token), V).float()


def test_euler_solver_jump_rate_and_final_step():
    batch, length = 1000, 4
    model = ProbModel(one_hot_probs(1, length))
    solver = flow_matching.MixtureDiscreteEulerSolver(model, FlowPath(2.0), V)
    x_init = torch.full((batch, length), MASK)
    grid = torch.tensor([0.2, 0.45, 1.0])
    torch.manual_seed(0)
    states = solver.sample(x_init, None, time_grid=grid, return_intermediates=True)
    assert states.shape == (3, batch, length)
    assert torch.equal(states[0], x_init) and (states[-1] == 1).all()
    # flow_matching's jump probability 1 - exp(-h d_alpha / (1 - alpha)) at t = 0.2, h = 0.25
    rate = 1 - math.exp(-0.25 * 2 * 0.2 / (1 - 0.2 ** 2))
    observed = float((states[1] == 1).double().mean())
    assert abs(observed - rate) < 5 * math.sqrt(rate * (1 - rate) / (batch * length))
    assert len(model.times) == 2 and model.times[0][0].shape == (batch,)


def test_euler_solver_last_step_draws_from_the_posterior():
    probs = torch.softmax(torch.randn(1, V, generator=gen(5)), -1)
    solver = flow_matching.MixtureDiscreteEulerSolver(ProbModel(probs), FlowPath(1.0), V)
    torch.manual_seed(1)
    out = solver.sample(torch.zeros(4000, 1, dtype=torch.int64), None)
    assert chi_square_pvalue(torch.bincount(out[:, 0], minlength=V), probs[0]) > 1e-3


def test_euler_solver_step_size_intermediates_extras_and_seed():
    model = ProbModel(torch.softmax(torch.randn(L, V, generator=gen(6)), -1))
    solver = flow_matching.MixtureDiscreteEulerSolver(model, flow_matching.MixturePath(
        PolynomialSchedule(1.0)), V)
    x_init = torch.full((2, L), MASK)
    run = lambda: solver.sample(x_init, 0.1, time_grid=torch.tensor([0.0, 0.5, 1.0]),
                                return_intermediates=True, label="extra")
    torch.manual_seed(3)
    first = run()
    torch.manual_seed(3)
    assert torch.equal(first, run())
    assert first.shape == (3, 2, L)
    assert len(model.times) == 2 * 10 and model.times[0][1] == {"label": "extra"}
    with pytest.raises(ValueError, match="div_free"):
        solver.sample(x_init, 0.1, div_free=1.0)
    with pytest.raises(ValueError, match="step_size"):
        solver.sample(x_init, 2.0)
    with pytest.raises(ValueError, match="source_distribution_p"):
        flow_matching.MixtureDiscreteEulerSolver(model, FlowPath(1.0), V, torch.ones(V + 1))


# ----------------------------------------------------------------------------- LLaDA

def llada_num_transfer_tokens(mask_index, steps):
    """Transcription of LLaDA's get_num_transfer_tokens."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base, remainder = mask_num // steps, mask_num % steps
    out = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        out[i, :remainder[i]] += 1
    return out


def llada_transfer_index_greedy(logits, remasking, mask_index, x, num_transfer_tokens, threshold):
    """Transcription of LLaDA's get_transfer_index at temperature 0."""
    x0 = logits.argmax(-1)
    if remasking == "low_confidence":
        p = F.softmax(logits.double(), dim=-1)
        x0_p = p.gather(-1, x0[..., None])[..., 0]
    else:
        x0_p = torch.rand(x0.shape)
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


def llada_batch(seed=0):
    x = torch.randint(0, MASK, (B, 8), generator=gen(seed))
    mask_index = torch.rand(B, 8, generator=gen(seed + 1)) < 0.6
    mask_index[:, 0] = True
    x = torch.where(mask_index, MASK, x)
    logits = 2 * torch.randn(B, 8, V, generator=gen(seed + 2))
    return logits, mask_index, x


def test_llada_num_transfer_tokens():
    _, mask_index, _ = llada_batch()
    for steps in (1, 3, 4, 9):
        assert torch.equal(llada.get_num_transfer_tokens(mask_index, steps),
                           llada_num_transfer_tokens(mask_index, steps))


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("threshold", [None, 0.5])
def test_llada_transfer_index_greedy_matches(remasking, threshold):
    logits, mask_index, x = llada_batch()
    count = torch.minimum(mask_index.sum(1), torch.tensor(2))
    torch.manual_seed(0)
    ours = llada.get_transfer_index(logits, 0.0, remasking, mask_index, x, count, threshold)
    torch.manual_seed(0)
    theirs = llada_transfer_index_greedy(logits, remasking, mask_index, x, count, threshold)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_llada_transfer_index_sampled(temperature):
    logits, mask_index, x = llada_batch(3)
    count = torch.ones(B, dtype=torch.int64)
    x0, transfer = llada.get_transfer_index(logits, temperature, "low_confidence", mask_index, x,
                                            count)
    assert torch.equal(x0[~mask_index], x[~mask_index])
    confidence = torch.softmax(logits.double(), -1).gather(-1, x0[..., None])[..., 0]
    best = torch.where(mask_index, confidence, -1.0).argmax(1)
    assert transfer.sum().item() == B and transfer[torch.arange(B), best].all()
    # the draw: x0 ~ softmax(z / T) at a masked position, over many rows
    row = logits[:1, :1].expand(4000, 1, V)
    many = llada.get_transfer_index(row, temperature, "random", torch.ones(4000, 1, dtype=bool),
                                    torch.full((4000, 1), MASK), 1)[0]
    probs = torch.softmax(logits[0, 0] / temperature, -1)
    assert chi_square_pvalue(torch.bincount(many[:, 0], minlength=V), probs) > 1e-3


def test_llada_bad_inputs():
    logits, mask_index, x = llada_batch()
    with pytest.raises(ValueError, match="remasking"):
        llada.get_transfer_index(logits, 0.0, "top_k", mask_index, x, 1)
    with pytest.raises(ValueError, match="temperature"):
        llada.get_transfer_index(logits, -1.0, "random", mask_index, x, 1)
    with pytest.raises(ValueError, match="num_transfer_tokens"):
        llada.get_transfer_index(logits, 0.0, "random", mask_index, x, None)
    with pytest.raises(TypeError, match="mask_index"):
        llada.get_num_transfer_tokens(mask_index.long(), 2)


def test_llada_masked_ce_values_and_gradients():
    ids = torch.randint(0, MASK, (B, L), generator=gen(7))
    p_mask = torch.tensor([[0.3], [0.6], [0.9]]).expand(B, L)
    masked = torch.rand(B, L, generator=gen(8)) < p_mask
    logits = leaf_logits(9)
    ours = llada.masked_ce(logits, ids, masked, p_mask)
    theirs = (F.cross_entropy(logits[masked], ids[masked], reduction="none")
              / p_mask[masked]).sum() / (B * L)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_of(ours, logits), grad_of(theirs, logits), rtol=1e-5,
                               atol=1e-7)


# ----------------------------------------------------------------------------- MDLM

def mdlm_subs_loss(logits, x0, xt, mask_id, weight):
    """Transcription of MDLM's SUBS parameterisation and per-token loss."""
    logits = logits.clone()
    logits[:, :, mask_id] += -1000000.0
    log_p = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    unmasked = xt != mask_id
    log_p[unmasked] = -1000000.0
    log_p[unmasked, xt[unmasked]] = 0
    log_p_theta = log_p.gather(-1, x0[..., None])[..., 0]
    return -log_p_theta * weight[:, None]


@pytest.mark.parametrize("mask_id", [MASK, 2])
def test_mdlm_subs_loss_values_and_gradients(mask_id):
    x0 = torch.randint(0, V - 1, (B, L), generator=gen(10))
    x0 = x0 + (x0 >= mask_id).long()  # clean tokens never equal the mask
    xt = torch.where(torch.rand(B, L, generator=gen(11)) < 0.5, mask_id, x0)
    weight = torch.tensor([1.5, 4.0, 10.0])
    logits = leaf_logits(12)
    ours = mdlm.subs_loss(logits, x0, xt, mask_id, weight)
    theirs = mdlm_subs_loss(logits, x0, xt, mask_id, weight)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_of(ours, logits), grad_of(theirs, logits), rtol=1e-5,
                               atol=1e-6)
    per_token = mdlm.subs_loss(logits, x0, xt, mask_id, weight[:, None].expand(B, L))
    torch.testing.assert_close(per_token, ours)
    with pytest.raises(ValueError, match="xt"):
        mdlm.subs_loss(logits, x0, xt[:, :2], mask_id, weight)
