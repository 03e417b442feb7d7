"""Sampler loops (tcsm_kernels.sampling) with toy denoisers whose output distribution is known."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tcsm_kernels import sampling
from tcsm_kernels.ops.ctmc_step import ctmc_step
from tcsm_kernels.schedules import CosineSchedule, LinearSchedule, PolynomialSchedule

from .conftest import HAS_CUDA

MASK = 2  # not the last column, on purpose
V = 6


class FixedLogits:
    """Denoiser with per-position logits (L, V) independent of x_t and t; counts its calls."""

    def __init__(self, logits):
        self.logits = logits
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return self.logits.expand(x.shape[0], -1, -1)


class StateDependent:
    """Denoiser whose logits depend on x_t and t (mask column finite, excluded by the sampler)."""

    def __init__(self, length, vocab, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.base = torch.randn(length, vocab, generator=g)
        self.mix = torch.randn(vocab, vocab, generator=g)
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        context = torch.nn.functional.one_hot(x, self.base.shape[1]).float().mean(1)  # (B, V)
        return self.base + (context @ self.mix)[:, None, :] + 2 * t[:, None, None]


def random_logits(length, vocab=V, seed=0, scale=1.5):
    return scale * torch.randn(length, vocab, generator=torch.Generator().manual_seed(seed))


def all_masked(batch, length):
    return torch.full((batch, length), MASK, dtype=torch.int64)


def chi_square_pvalue(counts, probs):
    """Pearson chi-square over independent categorical rows: counts, probs (R, K) -> p-value."""
    n = counts.sum(1, keepdim=True).double()
    expected = n * probs.double()
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    dof = counts.shape[0] * (counts.shape[1] - 1)
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2))


@pytest.mark.parametrize("method,dtype", [("exact", torch.int64), ("euler", torch.int32),
                                          ("confidence", torch.int64)])
def test_masks_filled_frozen_unchanged(method, dtype):
    x = torch.tensor([[4, 0, MASK, MASK, MASK, MASK, 1, MASK],
                      [MASK, MASK, 3, MASK, MASK, 5, MASK, MASK]], dtype=dtype)
    frozen = torch.zeros_like(x, dtype=torch.bool)
    frozen[0, 5] = True  # a frozen mask stays a mask
    frozen[1, 2] = True
    out = sampling.sample_masked(FixedLogits(random_logits(8)), x, steps=4, mask_id=MASK,
                                 method=method, frozen=frozen)
    generated = (x == MASK) & ~frozen
    assert out.dtype == x.dtype and out.shape == x.shape
    assert not (out[generated] == MASK).any()
    assert torch.equal(out[~generated], x[~generated])


@pytest.mark.parametrize("method", ["exact", "euler", "confidence"])
def test_reproducible_by_seed(method):
    model = FixedLogits(random_logits(16, scale=0.5))
    run = lambda seed: sampling.sample_masked(model, all_masked(4, 16), steps=5, mask_id=MASK,
                                              method=method, seed=seed)
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


@pytest.mark.parametrize("method,temperature", [("exact", 1.0), ("exact", 0.6), ("euler", 1.0)])
def test_final_tokens_follow_softmax(method, temperature):
    """Model independent of x_t: each generated token ~ softmax(z / T) without the mask column.
    Chi-square over 3 positions x 4 degrees of freedom; a correct sampler fails with probability
    1e-3 per random seed (the seed is fixed, so the test is deterministic)."""
    length, batch = 3, 3000
    logits = random_logits(length)
    out = sampling.sample_masked(FixedLogits(logits), all_masked(batch, length), steps=4,
                                 mask_id=MASK, method=method, temperature=temperature, seed=3)
    keep = [c for c in range(V) if c != MASK]
    counts = torch.stack([torch.bincount(out[:, i], minlength=V)[keep] for i in range(length)])
    probs = (logits[:, keep] / temperature).softmax(-1)
    assert counts.sum() == batch * length
    assert chi_square_pvalue(counts, probs) > 1e-3


@pytest.mark.parametrize("method", ["exact", "euler"])
def test_unmasking_times_follow_schedule(method):
    """Fraction of positions unmasked after step k: exact kappa(t_{k+1}) (kappa(0) = 0), Euler
    1 - prod_j exp(-h w(t_j)); within 5 binomial standard deviations."""
    schedule, steps, batch, length = CosineSchedule(), 5, 400, 10
    _, trajectory = sampling.sample_masked(
        FixedLogits(random_logits(length)), all_masked(batch, length), steps=steps, mask_id=MASK,
        method=method, schedule=schedule, return_trajectory=True, seed=11)
    grid = torch.arange(steps + 1, dtype=torch.float64) / steps
    if method == "exact":
        expected = schedule.kappa(grid[1:])
    else:
        stay = torch.exp(-(grid[1:] - grid[:-1]) * schedule.time_weight(grid[:-1]))
        expected = 1 - torch.cumprod(stay, 0)
        expected[-1] = 1.0
    n = batch * length
    for state, p in zip(trajectory, expected.tolist()):
        observed = float((state != MASK).double().mean())
        assert abs(observed - p) <= 5 * (p * (1 - p) / n) ** 0.5 + 1e-12


def test_confidence_reveals_the_most_confident_tokens():
    length, steps, per_step = 8, 4, 2
    logits = random_logits(length, scale=2.0)
    x0 = all_masked(3, length)
    out, trajectory = sampling.sample_masked(
        FixedLogits(logits), x0, steps=steps, mask_id=MASK, method="confidence",
        tokens_per_step=per_step, seed=5, return_trajectory=True)
    before = x0
    for k, after in enumerate(trajectory):
        step = ctmc_step(logits.expand(3, -1, -1), before, torch.zeros(()), mask_id=MASK, seed=5,
                         offset=k, return_x1=True, return_confidence=True)
        changed = after != before
        assert changed.sum(1).tolist() == [per_step] * 3
        score = torch.where(before == MASK, step.prob, -1.0)
        expected = torch.zeros_like(changed).scatter_(1, score.topk(per_step, dim=1).indices, True)
        assert torch.equal(changed, expected)
        assert torch.equal(after[changed], step.x1[changed])
        before = after
    assert torch.equal(out, trajectory[-1])


@pytest.mark.parametrize("confidence", ["margin", "entropy"])
def test_margin_and_entropy_reveal_peaked_positions_first(confidence):
    scales = torch.tensor([0.5, 3.0, 1.0, 2.0])
    base = torch.tensor([2.0, 1.0, 0.0, 0.0, -1.0, 0.5])
    logits = scales[:, None] * base
    _, trajectory = sampling.sample_masked(
        FixedLogits(logits), all_masked(2, 4), steps=4, mask_id=MASK, method="confidence",
        confidence=confidence, tokens_per_step=1, return_trajectory=True)
    revealed = [int((after != before)[0].nonzero()) for before, after in
                zip([all_masked(2, 4)] + trajectory[:-1], trajectory)]
    assert revealed == [1, 3, 2, 0]


def test_random_confidence_reveals_counts_by_schedule():
    _, trajectory = sampling.sample_masked(
        FixedLogits(random_logits(10)), all_masked(3, 10), steps=5, mask_id=MASK,
        method="confidence", confidence="random", return_trajectory=True)
    still_masked = [(state == MASK).sum(1).tolist() for state in trajectory]
    assert still_masked == [[10 - 2 * (k + 1)] * 3 for k in range(5)]


def test_blockwise_touches_only_the_current_block():
    prompt = torch.tensor([[4, 5]])
    x = torch.cat([prompt, all_masked(1, 6)], dim=1).expand(2, -1).clone()
    _, trajectory = sampling.sample_masked(
        FixedLogits(random_logits(8)), x, steps=4, mask_id=MASK, method="confidence",
        block_length=4, return_trajectory=True)
    # block 0: positions 2..5 (the first four to generate), steps 0-1; block 1: 6..7, steps 2-3
    for k, state in enumerate(trajectory):
        assert torch.equal(state[:, :2], x[:, :2])
        if k < 2:
            assert (state[:, 6:] == MASK).all()
            assert ((state[:, 2:6] != MASK).sum(1) == 2 * (k + 1)).all()
        else:
            assert (state[:, 2:6] != MASK).all()
            assert ((state[:, 6:] != MASK).sum(1) == k - 1).all()


def test_blockwise_per_sequence_prompts():
    x = torch.tensor([[4, MASK, MASK, MASK, MASK], [4, 0, 1, MASK, MASK]])
    _, trajectory = sampling.sample_masked(
        FixedLogits(random_logits(5)), x, steps=4, mask_id=MASK, method="confidence",
        block_length=2, return_trajectory=True)
    first = trajectory[1]  # end of block 0: the first two generated positions of each sequence
    assert (first[0, 1:3] != MASK).all() and (first[0, 3:] == MASK).all()
    assert (first[1, 3:] != MASK).all()


@pytest.mark.parametrize("method,options", [
    ("exact", {}), ("euler", {"schedule": PolynomialSchedule(2.0)}),
    ("confidence", {"tokens_per_step": 3}), ("confidence", {"block_length": 2}),
])
def test_cache_same_output_fewer_calls(method, options):
    length, steps = 4, 12
    cached, plain = StateDependent(length, V), StateDependent(length, V)
    x = all_masked(2, length)
    x[1, 0] = 5
    run = lambda model, cache: sampling.sample_masked(
        model, x, steps=steps, mask_id=MASK, method=method, cache=cache, seed=2,
        return_trajectory=True, **options)
    out_cached, traj_cached = run(cached, True)
    out_plain, traj_plain = run(plain, False)
    assert torch.equal(out_cached, out_plain)
    assert all(torch.equal(a, b) for a, b in zip(traj_cached, traj_plain))
    assert plain.calls >= steps
    assert cached.calls < plain.calls
    assert cached.calls <= int((x == MASK).sum())  # only steps that reveal a token call it


def test_final_denoise_fills_leftovers_with_argmax():
    logits = random_logits(6)
    x = all_masked(2, 6)
    model = FixedLogits(logits)
    partial = sampling.sample_masked(model, x, steps=2, mask_id=MASK, method="confidence",
                                     tokens_per_step=1, final_denoise=False)
    assert ((partial == MASK).sum(1) == 4).all()
    full = sampling.sample_masked(model, x, steps=2, mask_id=MASK, method="confidence",
                                  tokens_per_step=1)
    greedy = logits.clone()
    greedy[:, MASK] = float("-inf")
    leftover = partial == MASK
    assert torch.equal(full[leftover], greedy.argmax(-1).expand(2, -1)[leftover])
    assert torch.equal(full[~leftover], partial[~leftover])


def test_trajectory_and_progress(capsys):
    out, trajectory = sampling.sample_masked(
        FixedLogits(random_logits(5)), all_masked(2, 5), steps=3, mask_id=MASK,
        return_trajectory=True, progress=True)
    assert len(trajectory) == 3 and torch.equal(trajectory[-1], out)
    err = capsys.readouterr().err
    assert "3/3" in err or "100%" in err


def test_uniform_sampler_changes_tokens():
    length, batch, steps = 6, 8, 5
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (batch, length), generator=g)
    model = StateDependent(length, V)
    out, trajectory = sampling.sample_uniform(model, x, steps=steps, seed=4,
                                              return_trajectory=True)
    assert len(trajectory) == steps and model.calls == steps
    assert torch.equal(out, trajectory[-1]) and not torch.equal(out, x)
    assert int(out.min()) >= 0 and int(out.max()) < V
    assert torch.equal(out, sampling.sample_uniform(model, x, steps=steps, seed=4))
    peaked = torch.full((length, V), -30.0)
    peaked[:, 3] = 30.0  # the last step moves every position to x1 = 3
    assert (sampling.sample_uniform(FixedLogits(peaked), x, steps=steps) == 3).all()


def test_uniform_sampler_final_tokens_follow_softmax():
    length, batch = 2, 3000
    logits = random_logits(length)
    x = torch.zeros(batch, length, dtype=torch.int64)
    out = sampling.sample_uniform(FixedLogits(logits), x, steps=3, temperature=0.8, seed=9)
    counts = torch.stack([torch.bincount(out[:, i], minlength=V) for i in range(length)])
    assert chi_square_pvalue(counts, (logits / 0.8).softmax(-1)) > 1e-3


def _good_model():
    return FixedLogits(random_logits(4))


@pytest.mark.parametrize("change,error,match", [
    ({"steps": 0}, ValueError, "steps"),
    ({"steps": 2.0}, TypeError, "steps"),
    ({"method": "ddim"}, ValueError, "method"),
    ({"confidence": "max"}, ValueError, "confidence"),
    ({"mask_id": -1}, ValueError, "mask_id"),
    ({"mask_id": V, "x_init": torch.full((2, 4), V)}, ValueError, "mask_id"),
    ({"mask_id": 1.0}, TypeError, "mask_id"),
    ({"frozen": torch.zeros(2, 3, dtype=torch.bool)}, ValueError, "frozen"),
    ({"frozen": torch.zeros(2, 4)}, TypeError, "frozen"),
    ({"x_init": torch.zeros(2, 4)}, TypeError, "x_init"),
    ({"x_init": torch.zeros(8, dtype=torch.int64)}, ValueError, "x_init"),
    ({"x_init": torch.tensor([[MASK, V + 3, MASK, MASK]] * 2)}, ValueError, "x_init"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"tokens_per_step": 2}, ValueError, "tokens_per_step"),
    ({"method": "confidence", "tokens_per_step": 0}, ValueError, "tokens_per_step"),
    ({"method": "confidence", "block_length": 1, "steps": 2}, ValueError, "blocks"),
    ({"seed": -1}, ValueError, "seed"),
    ({"schedule": 3}, TypeError, "schedule"),
    ({"schedule": "exponential"}, ValueError, "schedule"),
    ({"model": "not a model"}, TypeError, "model"),
    ({"model": lambda x, t: torch.zeros(x.shape[0], V)}, ValueError, "logits of shape"),
    ({"cuda_graph": True}, ValueError, "cuda_graph"),
])
def test_bad_inputs_raise(change, error, match):
    if change.get("cuda_graph") and HAS_CUDA:
        pytest.skip("cuda_graph is valid on this machine's CUDA tensors only; x_init is CPU")
    kwargs = dict(model=_good_model(), x_init=all_masked(2, 4), steps=4, mask_id=MASK)
    kwargs.update(change)
    model, x_init = kwargs.pop("model"), kwargs.pop("x_init")
    with pytest.raises(error, match=match):
        sampling.sample_masked(model, x_init, **kwargs)


def test_uniform_bad_inputs_raise():
    x = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="steps"):
        sampling.sample_uniform(_good_model(), x, steps=0)
    with pytest.raises(ValueError, match="temperature"):
        sampling.sample_uniform(_good_model(), x, steps=2, temperature=-1.0)
    with pytest.raises(ValueError, match="logits of shape"):
        sampling.sample_uniform(_good_model(), x, steps=2)  # model has L=4, x has L=3


def test_linear_schedule_is_the_default():
    model = FixedLogits(random_logits(6))
    default = sampling.sample_masked(model, all_masked(3, 6), steps=4, mask_id=MASK, seed=1)
    linear = sampling.sample_masked(model, all_masked(3, 6), steps=4, mask_id=MASK, seed=1,
                                    schedule=LinearSchedule())
    named = sampling.sample_masked(model, all_masked(3, 6), steps=4, mask_id=MASK, seed=1,
                                   schedule="linear")
    assert torch.equal(default, linear) and torch.equal(default, named)


class EmbeddingDenoiser:
    """State-dependent logits from an embedding lookup (no op that reads values to the host,
    unlike one_hot's range check on CPU)."""

    def __init__(self, length, vocab, seed=0, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        self.base = torch.randn(length, vocab, generator=g).to(device)
        self.table = torch.randn(vocab, vocab, generator=g).to(device)

    def __call__(self, x, t):
        context = torch.nn.functional.embedding(x, self.table).mean(1)  # (B, V)
        return self.base + context[:, None, :] + 2 * t[:, None, None]


class NoHostReads(TorchDispatchMode):
    """Fails on what a CUDA-graph capture cannot hold: reads of device values on the host
    (item, bool, int, tolist, numpy), outputs sized by values (nonzero, masked_select, unique,
    boolean-mask indexing) and tensors made from Python sequences (a host-to-device copy on
    CUDA; Python scalars, which kernels take as arguments, are fine). Ops inside a custom op
    (the fused step's own launch code) are not seen."""

    FORBIDDEN = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique",
                 "_unique2", "unique_consecutive", "unique_dim"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.FORBIDDEN:
            raise AssertionError(f"host read or value-sized output in the loop: {func}")
        if name == "lift_fresh" and args[0].dim() > 0:
            raise AssertionError(f"tensor from Python data in the loop: {func}")
        if name in ("index", "index_put", "index_put_"):
            indices = args[1]
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                raise AssertionError(f"boolean-mask indexing in the loop: {func}")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist, self._numpy = torch.Tensor.tolist, torch.Tensor.numpy

        def refuse(*args, **kwargs):
            raise AssertionError("tolist()/numpy() in the loop")

        torch.Tensor.tolist = torch.Tensor.numpy = refuse
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist, torch.Tensor.numpy = self._tolist, self._numpy
        return super().__exit__(*exc)


def test_no_host_reads_detector_fails_on_a_sync():
    with pytest.raises(AssertionError, match="host read"):
        with NoHostReads():
            bool(torch.ones(3).sum() > 0)
    with pytest.raises(AssertionError, match="tolist"):
        with NoHostReads():
            torch.ones(3).tolist()
    with pytest.raises(AssertionError, match="boolean-mask"):
        with NoHostReads():
            x = torch.arange(4)
            x[x > 1]
    with pytest.raises(AssertionError, match="Python data"):
        with NoHostReads():
            torch.tensor([1, 2])


MASKED_GRAPH_CASES = [
    dict(method="exact"), dict(method="euler", schedule="cosine"),
    dict(method="confidence"), dict(method="confidence", confidence="random", tokens_per_step=3),
    dict(method="confidence", confidence="margin", block_length=4),
    dict(method="confidence", confidence="entropy", block_length=5, tokens_per_step=1),
]


@pytest.mark.parametrize("options", MASKED_GRAPH_CASES, ids=str)
def test_capturable_masked_loop_reads_nothing_and_matches_eager(options):
    """The loop that cuda_graph=True captures, run here eagerly on CPU with the seed as a tensor:
    no host read, no value-sized output, no tensor from Python data (what a capture needs), and
    the same tokens and trajectory as the eager, cached sampler."""
    length, steps = 12, 7
    model = EmbeddingDenoiser(length, V)
    x = all_masked(3, length)
    x[0, :3] = torch.tensor([0, 1, 3])  # a prompt
    frozen = torch.zeros_like(x, dtype=torch.bool)
    frozen[1, 5] = True
    want, want_path = sampling.sample_masked(model, x, steps=steps, mask_id=MASK, seed=11,
                                             frozen=frozen, return_trajectory=True, **options)
    sampler = sampling.samplers.MaskedSampler.validated(steps=steps, mask_id=MASK, **options)
    tables = sampler.tables(x, frozen)
    seed = torch.tensor(11)
    with NoHostReads():
        got, got_path = sampler.loop(tables, frozen, seed, cache=False, check=False).run(
            model, x, return_trajectory=True)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_path, want_path))


def test_capturable_uniform_loop_reads_nothing_and_matches_eager():
    model = EmbeddingDenoiser(10, V)
    x = torch.randint(0, V, (4, 10), generator=torch.Generator().manual_seed(2))
    want = sampling.sample_uniform(model, x, steps=6, seed=5)
    sampler = sampling.samplers.UniformSampler.validated(steps=6, schedule=LinearSchedule())
    frozen = torch.zeros_like(x, dtype=torch.bool)
    tables = sampler.tables(x, frozen)
    with NoHostReads():
        got = sampler.loop(tables, frozen, torch.tensor(5), cache=False, check=False).run(model, x)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("options", MASKED_GRAPH_CASES[:4], ids=str)
def test_cuda_graph_matches_eager(options):
    """Captured on the first call, replayed on the next ones (new seeds, new prompts): the same
    tokens and trajectories as eager, and no new capture."""
    length = 16
    model = EmbeddingDenoiser(length, V, device="cuda")
    sampling.clear_graph_cache()
    for seed in (3, 4, 5):
        x = all_masked(4, length).cuda()
        x[seed % 4, :2] = 1
        eager = sampling.sample_masked(model, x, steps=8, mask_id=MASK, seed=seed,
                                       return_trajectory=True, **options)
        graphed = sampling.sample_masked(model, x, steps=8, mask_id=MASK, seed=seed,
                                         return_trajectory=True, cuda_graph=True, **options)
        assert torch.equal(eager[0], graphed[0])
        assert all(torch.equal(a, b) for a, b in zip(eager[1], graphed[1]))
    assert len(sampling.graphs._GRAPHS) == 1


@pytest.mark.gpu
def test_cuda_graph_uniform_matches_eager():
    model = EmbeddingDenoiser(16, V, device="cuda")
    sampling.clear_graph_cache()
    for seed in (1, 2):
        x = torch.randint(0, V, (4, 16), device="cuda")
        eager = sampling.sample_uniform(model, x, steps=6, seed=seed)
        graphed = sampling.sample_uniform(model, x, steps=6, seed=seed, cuda_graph=True)
        assert torch.equal(eager, graphed)
    assert len(sampling.graphs._GRAPHS) == 1
