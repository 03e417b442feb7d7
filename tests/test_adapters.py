"""Adapters against the originals: the real flow_matching package (skipped when it is missing)
and transcriptions of flow_matching's loss, LLaDA's, Fast-dLLM's and MDLM's code (tests/_peer_*,
each with the file and commit it follows)."""
import inspect
import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from tcsm_kernels.adapters import flow_matching as fm_adapter
from tcsm_kernels.adapters import llada, mdlm
from tcsm_kernels.schedules import LinearSchedule, PolynomialSchedule

from . import _peer_flow_matching as peer_fm
from ._peer_llada import (fast_dllm_generate, fast_dllm_transfer_index, llada_add_gumbel_noise,
                          llada_generate, llada_num_transfer_tokens)
from ._peer_mdlm import mdlm_loglinear_weight, mdlm_subs_loss

needs_flow_matching = pytest.mark.skipif(peer_fm.MISSING is not None,
                                         reason=peer_fm.MISSING or "")

B, L, V, MASK = 3, 5, 7, 6


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def leaf_logits(seed=0, shape=(B, L, V)):
    return (1.5 * torch.randn(*shape, generator=gen(seed))).requires_grad_()


def grad_of(loss, inputs):
    return torch.autograd.grad(loss.sum(), inputs)


def chi_square_pvalue(counts, probs):
    """Goodness of fit of counts to probs."""
    expected = counts.sum().double() * probs.double()
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((counts.numel() - 1) / 2.0), stat / 2))


def two_sample_pvalue(a, b, cells):
    """Chi-square test that two equal-size samples of ids in [0, cells) share a distribution."""
    ca = torch.bincount(a.flatten(), minlength=cells).double()
    cb = torch.bincount(b.flatten(), minlength=cells).double()
    seen = (ca + cb) > 0
    stat = ((ca - cb) ** 2 / (ca + cb))[seen].sum()
    return float(torch.special.gammaincc(torch.tensor((int(seen.sum()) - 1) / 2.0), stat / 2))


# ----------------------------------------------------------------------------- flow_matching loss

def flow_batch(source, shape=(B, L)):
    x_1 = torch.randint(0, MASK, shape, generator=gen(1))
    t = torch.tensor([0.1, 0.5, 0.8])
    keep = torch.rand(shape, generator=gen(2)) < t.reshape((-1,) + (1,) * (len(shape) - 1))
    noise = (torch.full_like(x_1, MASK) if source == "mask"
             else torch.randint(0, V, shape, generator=gen(3)))
    return x_1, torch.where(keep, x_1, noise), t


REFERENCE_LOSSES = {
    "transcription": lambda n: (peer_fm.TranscribedGeneralizedKL, peer_fm.StandInPath(n)),
    "flow_matching": lambda n: (peer_fm.MixturePathGeneralizedKL, peer_fm.polynomial_path(n)),
}


@pytest.fixture(params=[pytest.param("transcription"),
                        pytest.param("flow_matching", marks=needs_flow_matching)])
def reference_loss(request):
    """(their loss class, their path for exponent n) by name."""
    return lambda n: REFERENCE_LOSSES[request.param](n)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("source", ["mask", "uniform"])
@pytest.mark.parametrize("shape", [(B, L), (B, 2, 3)])
def test_flow_matching_loss_values_and_gradients(reference_loss, reduction, source, shape):
    their_loss, path = reference_loss(2.0)
    x_1, x_t, t = flow_batch(source, shape)
    logits = leaf_logits(0, shape + (V,))
    t = t.clone().requires_grad_()
    ours = fm_adapter.MixturePathGeneralizedKL(path, reduction=reduction)(logits, x_1, x_t, t)
    theirs = their_loss(path, reduction)(logits, x_1, x_t, t)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for mine, their in zip(grad_of(ours, (logits, t)), grad_of(theirs, (logits, t))):
        torch.testing.assert_close(mine, their, rtol=1e-5, atol=1e-6)


def test_flow_matching_loss_makes_one_fused_call_keeping_one_gradient_buffer(monkeypatch):
    calls, saved = [], []
    fused = fm_adapter.fused_tcsm_loss
    monkeypatch.setattr(fm_adapter, "fused_tcsm_loss", lambda *a, **k: calls.append(1) or
                        fused(*a, **k))
    x_1, x_t, t = flow_batch("uniform")
    logits = leaf_logits(4)
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x,
                                                  lambda x: x):
        loss = fm_adapter.MixturePathGeneralizedKL(peer_fm.StandInPath(1.0))(logits, x_1, x_t,
                                                                              t)
    loss.backward()
    assert len(calls) == 1 and logits.grad.shape == logits.shape
    assert sum(numel >= logits.numel() for numel in saved) == 1  # the fused gradient buffer


def test_flow_matching_loss_is_a_loss_module_over_schedules_too():
    loss = fm_adapter.MixturePathGeneralizedKL(fm_adapter.MixturePath(LinearSchedule()))
    assert isinstance(loss, _Loss) and loss.reduction == "mean"
    x_1, x_t, t = flow_batch("uniform")
    logits = leaf_logits(5)
    expected = peer_fm.TranscribedGeneralizedKL(peer_fm.StandInPath(1.0))(logits, x_1, x_t, t)
    torch.testing.assert_close(loss(logits, x_1, x_t, t), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        fm_adapter.MixturePathGeneralizedKL(PolynomialSchedule(1.0))(logits, x_1, x_t, t),
        expected, rtol=1e-5, atol=1e-6)


@needs_flow_matching
def test_flow_matching_loss_rejects_a_bad_reduction_when_run_as_the_original():
    x_1, x_t, t = flow_batch("uniform")
    logits = leaf_logits(6)
    path = peer_fm.polynomial_path(1.0)
    for loss_class in (peer_fm.MixturePathGeneralizedKL, fm_adapter.MixturePathGeneralizedKL):
        loss = loss_class(path, reduction="avg")  # accepted at construction, as the original
        with pytest.raises(ValueError):
            loss(logits, x_1, x_t, t)


def test_flow_matching_loss_bad_inputs():
    x_1, x_t, t = flow_batch("uniform")
    logits = leaf_logits(7)
    loss = fm_adapter.MixturePathGeneralizedKL(peer_fm.StandInPath(1.0))
    with pytest.raises(ValueError, match="x_t"):
        loss(logits, x_1, x_t[:, :2], t)
    with pytest.raises(ValueError, match="x_t holds id"):
        loss(logits, x_1, torch.full_like(x_t, V), t)
    with pytest.raises(TypeError, match="x_1"):
        loss(logits, x_1.float(), x_t, t)
    with pytest.raises(ValueError, match="t of shape"):
        loss(logits, x_1, x_t, t[:2])
    with pytest.raises(TypeError, match="path"):
        fm_adapter.MixturePathGeneralizedKL(object())


# ----------------------------------------------------------------------------- flow_matching solver

class ProbModel:
    """flow_matching-style model: posterior probabilities (B, d, V) that depend on x_t."""

    def __init__(self, seed=0, vocab=V):
        self.table = torch.softmax(2 * torch.randn(vocab, vocab, generator=gen(seed)), -1)
        self.calls = []

    def __call__(self, x, t, **extras):
        self.calls.append((x.dtype, t.clone(), extras))
        return self.table[x]


def one_hot_model(token):
    return lambda x, t, **extras: F.one_hot(torch.full_like(x.long(), token), V).float()


def signature_parts(function):
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@needs_flow_matching
def test_euler_solver_signature_is_the_originals():
    ours = signature_parts(fm_adapter.MixtureDiscreteEulerSolver.sample)
    theirs = signature_parts(peer_fm.MixtureDiscreteEulerSolver.sample)
    assert [p[:2] for p in ours] == [p[:2] for p in theirs]
    for (name, _, mine), (_, _, their) in zip(ours, theirs):
        same = torch.equal(mine, their) if isinstance(mine, torch.Tensor) else mine == their
        assert same, name


SOLVER_CASES = {  # (source distribution, div_free)
    "uniform, no div_free": ("uniform", 0.0),
    "uniform, div_free 2": ("uniform", 2.0),
    "uniform, div_free(t) = 3 t": ("uniform", lambda t: 3 * t),
    "mask, div_free 1": ("mask", 1.0),
}


@needs_flow_matching
@pytest.mark.parametrize("case", list(SOLVER_CASES))
def test_euler_solver_matches_flow_matching_in_distribution(case):
    """Every state on the grid, as a (start token, state) pair, in distribution."""
    source, div_free = SOLVER_CASES[case]
    rows = 6000
    p0 = (torch.full((V,), 1.0 / V) if source == "uniform"
          else F.one_hot(torch.tensor(MASK), V).float())
    x_init = torch.randint(0, V, (rows, 1), generator=gen(8))
    if source == "mask":
        x_init[: rows // 2] = MASK
    grid = torch.tensor([0.2, 0.45, 0.7, 1.0])
    path = peer_fm.polynomial_path(1.0)
    torch.manual_seed(0)
    ours = fm_adapter.MixtureDiscreteEulerSolver(ProbModel(), path, V, p0).sample(
        x_init, None, div_free=div_free, time_grid=grid, return_intermediates=True)
    theirs = peer_fm.MixtureDiscreteEulerSolver(ProbModel(), path, V, p0).sample(
        x_init, None, div_free=div_free, time_grid=grid, return_intermediates=True)
    assert ours.shape == theirs.shape == (4, rows, 1) and ours.dtype == theirs.dtype
    assert torch.equal(ours[0], theirs[0])
    for k in (1, 2, 3):
        assert two_sample_pvalue(ours[k] * V + x_init, theirs[k] * V + x_init, V * V) > 1e-3


def state_labels(states, x_init, token):
    """Per stacked state: "start" (= x_init), "end" (all token) or "between"."""
    return ["start" if torch.equal(s, x_init) else "end" if (s == token).all() else "between"
            for s in states]


@needs_flow_matching
@pytest.mark.parametrize("step_size,time_grid", [
    (None, [0.0, 1.0]), (None, [0.2, 0.45, 1.0]), (0.1, [0.0, 0.5, 1.0]),
    (0.15, [0.0, 0.6, 0.3, 1.0]), (0.25, [0.1, 0.9])])
def test_euler_solver_structure_and_final_state_exactly_as_flow_matching(step_size, time_grid):
    """A one-hot posterior makes the final state certain: the outputs, and which of the stacked
    intermediates are the start, the end or in between (64 positions: never all or none
    jumped by chance), equal flow_matching's exactly."""
    time_grid = torch.tensor(time_grid)
    x_init = torch.randint(0, 2, (8, 8), generator=gen(9))
    path = peer_fm.polynomial_path(2.0)
    ours, theirs = (solver(one_hot_model(2), path, V).sample(x_init, step_size,
                                                             time_grid=time_grid)
                    for solver in (fm_adapter.MixtureDiscreteEulerSolver,
                                   peer_fm.MixtureDiscreteEulerSolver))
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    ours, theirs = (solver(one_hot_model(2), path, V).sample(
        x_init, step_size, time_grid=time_grid, return_intermediates=True)
        for solver in (fm_adapter.MixtureDiscreteEulerSolver, peer_fm.MixtureDiscreteEulerSolver))
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert state_labels(ours, x_init, 2) == state_labels(theirs, x_init, 2)


def test_euler_solver_int32_start_and_model_keywords():
    model = ProbModel(10)
    solver = fm_adapter.MixtureDiscreteEulerSolver(model, peer_fm.StandInPath(1.0), np.int64(V))
    x_init = torch.zeros(2, L, dtype=torch.int32)
    torch.manual_seed(3)
    first = solver.sample(x_init, np.float64(0.25), label="extra")
    torch.manual_seed(3)
    assert torch.equal(first, solver.sample(x_init, 0.25, label="extra"))
    assert first.dtype == torch.int64  # flow_matching returns x_1 ~ categorical: int64
    assert len(model.calls) == 2 * 4
    assert all(dtype == torch.int32 and t.shape == (2,) and extras == {"label": "extra"}
               for dtype, t, extras in model.calls)


def test_euler_solver_generator_and_jump_rate():
    batch, length = 1000, 4
    solver = fm_adapter.MixtureDiscreteEulerSolver(one_hot_model(1), peer_fm.StandInPath(2.0), V,
                                                   generator=gen(11))
    x_init = torch.full((batch, length), MASK)
    states = solver.sample(x_init, None, time_grid=torch.tensor([0.2, 0.45, 1.0]),
                           return_intermediates=True)
    assert torch.equal(states[0], x_init) and (states[-1] == 1).all()
    # the jump probability 1 - exp(-h d_alpha / (1 - alpha)) at t = 0.2, h = 0.25
    rate = 1 - math.exp(-0.25 * 2 * 0.2 / (1 - 0.2 ** 2))
    observed = float((states[1] == 1).double().mean())
    assert abs(observed - rate) < 5 * math.sqrt(rate * (1 - rate) / (batch * length))
    again = fm_adapter.MixtureDiscreteEulerSolver(one_hot_model(1), peer_fm.StandInPath(2.0), V,
                                                  generator=gen(11))
    assert torch.equal(states, again.sample(x_init, None, time_grid=torch.tensor(
        [0.2, 0.45, 1.0]), return_intermediates=True))


def test_euler_solver_last_step_draws_from_the_posterior():
    probs = torch.softmax(torch.randn(1, V, generator=gen(5)), -1)
    solver = fm_adapter.MixtureDiscreteEulerSolver(lambda x, t: probs.expand(x.shape[0], -1, -1),
                                                   peer_fm.StandInPath(1.0), V)
    torch.manual_seed(1)
    out = solver.sample(torch.zeros(4000, 1, dtype=torch.int64), None)
    assert chi_square_pvalue(torch.bincount(out[:, 0], minlength=V), probs[0]) > 1e-3


def test_euler_solver_bad_inputs():
    model = ProbModel()
    path = peer_fm.StandInPath(1.0)
    solver = fm_adapter.MixtureDiscreteEulerSolver(model, path, V)
    x_init = torch.full((2, L), MASK)
    with pytest.raises(ValueError, match="source_distribution_p"):
        solver.sample(x_init, 0.1, div_free=1.0)
    with pytest.raises(ValueError, match="source_distribution_p"):
        solver.sample(x_init, 0.1, div_free=lambda t: t)
    with pytest.raises(ValueError, match="alpha_t = 0"):
        fm_adapter.MixtureDiscreteEulerSolver(model, path, V, torch.ones(V) / V).sample(
            x_init, 0.5, div_free=1.0)
    with pytest.raises(ValueError, match="step_size"):
        solver.sample(x_init, 2.0)
    with pytest.raises(ValueError, match="nearest step"):  # flow_matching: an IndexError
        solver.sample(x_init, 0.1, time_grid=torch.tensor([0.0, 1.0, 0.33]),
                      return_intermediates=True)
    with pytest.raises(TypeError, match="x_init"):
        solver.sample(x_init.float(), 0.1)
    with pytest.raises(ValueError, match="time_grid"):
        solver.sample(x_init, None, time_grid=torch.tensor([0.0]))
    with pytest.raises(TypeError, match="dtype_categorical"):
        solver.sample(x_init, 0.1, dtype_categorical=torch.int64)
    with pytest.raises(ValueError, match="the model must return"):
        fm_adapter.MixtureDiscreteEulerSolver(model, path, V + 1).sample(x_init, 0.5)
    with pytest.raises(ValueError, match="source_distribution_p"):
        fm_adapter.MixtureDiscreteEulerSolver(model, path, V, torch.ones(V + 1))
    with pytest.raises(TypeError, match="vocabulary_size"):
        fm_adapter.MixtureDiscreteEulerSolver(model, path, float(V))
    with pytest.raises(TypeError, match="generator"):
        fm_adapter.MixtureDiscreteEulerSolver(model, path, V, generator=0)


# ----------------------------------------------------------------------------- LLaDA helpers

def llada_batch(seed=0):
    x = torch.randint(0, MASK, (B, 8), generator=gen(seed))
    mask_index = torch.rand(B, 8, generator=gen(seed + 1)) < 0.6
    mask_index[:, 0] = True
    x = torch.where(mask_index, MASK, x)
    logits = 2 * torch.randn(B, 8, V, generator=gen(seed + 2))
    return logits, mask_index, x


def test_llada_add_gumbel_noise_is_the_originals():
    logits = 2 * torch.randn(B, L, V, generator=gen(20))
    for temperature in (0.5, 1.0):
        torch.manual_seed(4)
        ours = llada.add_gumbel_noise(logits, temperature)
        torch.manual_seed(4)
        assert torch.equal(ours, llada_add_gumbel_noise(logits, temperature))
    assert llada.add_gumbel_noise(logits, 0) is logits
    with pytest.raises(ValueError, match="temperature"):
        llada.add_gumbel_noise(logits, -1.0)


def test_llada_num_transfer_tokens():
    _, mask_index, _ = llada_batch()
    for steps in (1, 3, 4, np.int64(9)):
        expected = llada_num_transfer_tokens(mask_index, int(steps))
        assert torch.equal(llada.get_num_transfer_tokens(mask_index, steps), expected)
        assert torch.equal(llada.get_num_transfer_tokens(mask_index.int(), steps), expected)


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("threshold", [None, 0.5])
def test_llada_transfer_index_greedy_matches_fast_dllm(remasking, threshold):
    logits, mask_index, x = llada_batch()
    count = torch.minimum(mask_index.sum(1), torch.tensor(2))
    torch.manual_seed(0)
    ours = llada.get_transfer_index(logits, 0.0, remasking, mask_index.long(), x, count,
                                    threshold)
    torch.manual_seed(0)
    theirs = fast_dllm_transfer_index(logits, 0.0, remasking, mask_index, x, count, threshold)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_llada_transfer_index_sampled(temperature):
    logits, mask_index, x = llada_batch(3)
    x0, transfer = llada.get_transfer_index(logits, temperature, "low_confidence", mask_index, x,
                                            np.int64(1))
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


def test_llada_helpers_bad_inputs():
    logits, mask_index, x = llada_batch()
    with pytest.raises(NotImplementedError, match="remasking"):  # the originals' type
        llada.get_transfer_index(logits, 0.0, "top_k", mask_index, x, 1)
    with pytest.raises(ValueError, match="temperature"):
        llada.get_transfer_index(logits, -1.0, "random", mask_index, x, 1)
    with pytest.raises(ValueError, match="num_transfer_tokens"):
        llada.get_transfer_index(logits, 0.0, "random", mask_index, x, None)
    with pytest.raises(ValueError, match="num_transfer_tokens"):
        llada.get_transfer_index(logits, 0.0, "random", mask_index, x, torch.ones(2, 2).long())
    with pytest.raises(ValueError, match="mask_index must hold only 0 and 1"):
        llada.get_num_transfer_tokens(mask_index.long() * 2, 2)
    with pytest.raises(TypeError, match="mask_index"):
        llada.get_num_transfer_tokens(mask_index.float(), 2)
    with pytest.raises(TypeError, match="steps"):
        llada.get_num_transfer_tokens(mask_index, 2.0)


def test_llada_masked_ce_values_and_gradients():
    ids = torch.randint(0, MASK, (B, L), generator=gen(7))
    p_mask = torch.tensor([[0.3], [0.6], [0.9]])
    masked = torch.rand(B, L, generator=gen(8)) < p_mask
    logits = leaf_logits(9)
    ours = llada.masked_ce(logits, ids, masked.int(), p_mask)
    # LLaDA's GUIDELINES.md pre-training loss
    p_full = p_mask.expand(B, L)
    theirs = (F.cross_entropy(logits[masked], ids[masked], reduction="none")
              / p_full[masked]).sum() / (B * L)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    (mine,), (their,) = grad_of(ours, (logits,)), grad_of(theirs, (logits,))
    torch.testing.assert_close(mine, their, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="masked"):
        llada.masked_ce(logits, ids, masked[:, :2], p_mask)


# ----------------------------------------------------------------------------- LLaDA generate

LLADA_V, LLADA_MASK = 12, 11


class ToyLM:
    """Deterministic stand-in for LLaDA's mask predictor: ``model(x).logits`` (B, L, V)
    depends on every token and position; the mask token is never the argmax."""

    device = torch.device("cpu")

    def __init__(self, seed=0):
        g = gen(seed)
        self.embed = torch.randn(LLADA_V, 8, generator=g)
        self.position = torch.randn(64, 8, generator=g)
        self.head = torch.randn(8, LLADA_V, generator=g)
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        h = self.embed[x] + self.position[:x.shape[1]]
        logits = 3 * torch.tanh(h + h.mean(dim=1, keepdim=True)) @ self.head
        logits[..., LLADA_MASK] = -20.0
        return types.SimpleNamespace(logits=logits)


def toy_prompt(seed=0, length=4):
    return torch.randint(0, LLADA_MASK, (1, length), generator=gen(seed))


LLADA_CASES = [  # steps, gen_length, block_length, cfg_scale, remasking
    (8, 8, 8, 0.0, "low_confidence"),
    (8, 8, 4, 0.0, "low_confidence"),
    (4, 8, 2, 0.0, "low_confidence"),
    (16, 8, 4, 0.0, "low_confidence"),  # more steps than tokens: steps that reveal none
    (8, 8, 4, 0.5, "low_confidence"),
    (8, 8, 8, 0.0, "random"),
    (6, 12, 4, 1.5, "random"),
]


@pytest.mark.parametrize("case", LLADA_CASES, ids=str)
def test_llada_generate_greedy_is_the_originals(case):
    steps, gen_length, block_length, cfg_scale, remasking = case
    for seed in (0, 1):
        prompt = toy_prompt(seed)
        torch.manual_seed(seed)
        ours = llada.generate(ToyLM(seed), prompt, steps, gen_length, block_length, 0.0,
                              cfg_scale, remasking, LLADA_MASK)
        torch.manual_seed(seed)
        theirs = llada_generate(ToyLM(seed), prompt, steps, gen_length, block_length, 0.0,
                                cfg_scale, remasking, LLADA_MASK)
        assert torch.equal(ours, theirs)
        assert not (ours == LLADA_MASK).any()


FAST_DLLM_CASES = [  # steps, gen_length, block_length, remasking, threshold
    (8, 8, 8, "low_confidence", 0.9),
    (8, 8, 4, "low_confidence", 0.5),
    (4, 8, 2, "low_confidence", 0.0),
    (8, 8, 4, "random", 0.6),
    (8, 8, 4, "low_confidence", None),
]


@pytest.mark.parametrize("case", FAST_DLLM_CASES, ids=str)
def test_llada_generate_threshold_is_fast_dllms(case):
    steps, gen_length, block_length, remasking, threshold = case
    for seed in (0, 2):
        prompt = toy_prompt(seed)
        model = ToyLM(seed)
        torch.manual_seed(seed)
        ours = llada.generate(model, prompt, steps=steps, gen_length=gen_length,
                              block_length=block_length, remasking=remasking,
                              mask_id=LLADA_MASK, threshold=threshold)
        torch.manual_seed(seed)
        theirs, nfe = fast_dllm_generate(ToyLM(seed), prompt, steps, gen_length, block_length,
                                         0.0, remasking, LLADA_MASK, threshold)
        assert torch.equal(ours, theirs)
        assert model.calls == nfe or threshold is None


def test_llada_generate_batches_rows_independently_and_takes_numpy_ints():
    prompts = torch.cat([toy_prompt(3), toy_prompt(4)]).int()
    model = ToyLM(5)
    both = llada.generate(model, prompts, np.int64(8), np.int64(8), np.int32(4),
                          mask_id=np.int64(LLADA_MASK))
    for row in range(2):
        alone = llada.generate(model, prompts[row:row + 1], 8, 8, 4, mask_id=LLADA_MASK)
        assert torch.equal(both[row:row + 1], alone)
    assert both.dtype == torch.int64 and both.shape == (2, 12)


def test_llada_generate_sampled_draws_from_the_tempered_posterior():
    prompt = toy_prompt(6).expand(3000, -1)
    model = ToyLM(6)
    temperature = 0.8
    torch.manual_seed(7)
    out = llada.generate(model, prompt, 1, 1, 1, temperature, mask_id=LLADA_MASK)
    torch.manual_seed(7)
    assert torch.equal(out, llada.generate(model, prompt, 1, 1, 1, temperature,
                                           mask_id=LLADA_MASK))
    start = torch.cat([prompt[:1], torch.tensor([[LLADA_MASK]])], dim=1)
    probs = torch.softmax(model(start).logits[0, -1] / temperature, -1)
    assert chi_square_pvalue(torch.bincount(out[:, -1], minlength=LLADA_V), probs) > 1e-3


def test_llada_generate_bad_inputs():
    prompt, model = toy_prompt(), ToyLM()
    with pytest.raises(NotImplementedError, match="remasking"):
        llada.generate(model, prompt, 4, 4, 4, remasking="top_k", mask_id=LLADA_MASK)
    with pytest.raises(ValueError, match="block_length"):
        llada.generate(model, prompt, 4, 6, 4, mask_id=LLADA_MASK)
    with pytest.raises(ValueError, match="steps"):
        llada.generate(model, prompt, 3, 8, 4, mask_id=LLADA_MASK)
    with pytest.raises(ValueError, match="temperature"):
        llada.generate(model, prompt, 4, 4, 4, -0.5, mask_id=LLADA_MASK)
    with pytest.raises(TypeError, match="gen_length"):
        llada.generate(model, prompt, 4, 4.0, 4, mask_id=LLADA_MASK)
    with pytest.raises(ValueError, match="prompt"):
        llada.generate(model, prompt[0], 4, 4, 4, mask_id=LLADA_MASK)
    with pytest.raises(TypeError, match="model's logits"):
        llada.generate(lambda x: None, prompt, 4, 4, 4, mask_id=LLADA_MASK)


# ----------------------------------------------------------------------------- MDLM

@pytest.mark.parametrize("mask_id", [MASK, 2])
def test_mdlm_subs_loss_values_and_gradients(mask_id):
    x0 = torch.randint(0, V - 1, (B, L), generator=gen(10))
    x0 = x0 + (x0 >= mask_id).long()  # clean tokens never equal the mask
    xt = torch.where(torch.rand(B, L, generator=gen(11)) < 0.5, mask_id, x0)
    weight = torch.tensor([1.5, 4.0, 10.0])
    logits = leaf_logits(12)
    ours = mdlm.subs_loss(logits, x0, xt, np.int64(mask_id), weight)
    theirs = mdlm_subs_loss(logits, x0, xt, mask_id, weight)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    (mine,), (their,) = grad_of(ours, (logits,)), grad_of(theirs, (logits,))
    torch.testing.assert_close(mine, their, rtol=1e-5, atol=1e-6)
    per_token = mdlm.subs_loss(logits, x0, xt, mask_id, weight[:, None].expand(B, L))
    torch.testing.assert_close(per_token, ours)


def test_mdlm_subs_loss_bad_inputs():
    x0 = torch.randint(0, MASK, (B, L), generator=gen(13))
    logits = leaf_logits(14)
    with pytest.raises(ValueError, match="xt"):
        mdlm.subs_loss(logits, x0, x0[:, :2], MASK, 1.0)
    with pytest.raises(ValueError, match="x0"):
        mdlm.subs_loss(logits, x0[:, :2], x0[:, :2], MASK, 1.0)
    with pytest.raises(ValueError, match="mask_id"):
        mdlm.subs_loss(logits, x0, x0, V, 1.0)
    with pytest.raises(ValueError, match="weight"):
        mdlm.subs_loss(logits, x0, x0, MASK, torch.ones(2, 2))


@pytest.mark.parametrize("t", [1e-3, 1e-5, 1e-7, 0.5, 1.0])
def test_mdlm_loglinear_weight_keeps_float32_precision_near_zero(t):
    exact = mdlm_loglinear_weight(torch.tensor([t], dtype=torch.float64))
    ours = mdlm.loglinear_weight(torch.tensor([t]))
    assert ours.dtype == torch.float32
    assert abs(float(ours.double() / exact) - 1) < 1e-6
    assert abs(float(exact) * t - 1) < 1e-12  # the weight is 1 / t
    assert mdlm.loglinear_weight(t).shape == ()
    torch.testing.assert_close(mdlm.loglinear_weight(torch.tensor([t], dtype=torch.float64)),
                               exact, rtol=1e-15, atol=0)


def test_mdlm_loglinear_weight_bad_inputs():
    with pytest.raises(ValueError, match="t must lie"):
        mdlm.loglinear_weight(torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="eps"):
        mdlm.loglinear_weight(0.5, eps=1.0)
    with pytest.raises(TypeError, match="t must"):
        mdlm.loglinear_weight("0.5")
