"""Fused CTMC reverse step (tcsm_kernels/ops/ctmc_step.py, docs/math.md 7) on every backend.

Backends: "reference" (the float64 oracle), "cpp" (the CPU kernel) and "triton" (compiled on
CUDA, else the Triton interpreter on CPU, which is slow (docs/performance_history.md): its
statistical tests shrink to a few hundred rows, and its main check is token-for-token agreement
with the reference on the same seeds). Every test uses fixed seeds, so it is deterministic; each
statistical threshold is stated with its false-alarm rate for a kernel that samples exactly.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tcsm_kernels import _backend, philox, reference
from tcsm_kernels.ops.ctmc_step import ctmc_step

from .conftest import HAS_CUDA, backends_for

FUSED_HERE = backends_for("cpu")
INTERPRETED = not HAS_CUDA


def _backend_params(names):
    return [pytest.param(name, marks=pytest.mark.skipif(
        name != "reference" and name not in FUSED_HERE, reason=f"backend {name} unavailable"))
        for name in names]


ALL = _backend_params(["reference", "cpp", "triton"])
FUSED = _backend_params(["cpp", "triton"])


def device_for(backend: str) -> str:
    return "cuda" if backend == "triton" and HAS_CUDA else "cpu"


def rows_for(backend: str, full: int, interpreted: int) -> int:
    return interpreted if backend == "triton" and INTERPRETED else full


def step(backend, logits, x, jump_prob, **kwargs):
    """ctmc_step on the backend's device, every output returned, results back on the CPU."""
    device = device_for(backend)
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    out = ctmc_step(logits.to(device), x.to(device), jump_prob.to(device), backend=backend,
                    return_x1=True, return_confidence=True, **moved)
    return reference.StepOutput(*(t.cpu() for t in out))


# ---------------------------------------------------------------------------------------------
# Statistical thresholds (no scipy)

Z_UPPER_1E4 = 3.7190164854556804  # standard normal: P(Z > z) = 1e-4


def chi2_upper_quantile(dof: int, z: float = Z_UPPER_1E4) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile with upper tail P(Z > z):
    dof * (1 - 2/(9 dof) + z sqrt(2/(9 dof)))^3. For dof = 5, 1e-4 it gives 26.3 (the exact
    value is 25.7), so the false-alarm rate is slightly below 1e-4."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * math.sqrt(c)) ** 3


def poisson_interval(lam: float, alpha: float = 1e-4):
    """Exact [lo, hi] with P(X < lo) <= alpha/2 and P(X > hi) <= alpha/2, X ~ Poisson(lam)."""
    k, pmf, below = 0, math.exp(-lam), 0.0
    lo = None
    while True:
        if lo is None and below + pmf > alpha / 2:
            lo = k
        below += pmf
        if below >= 1 - alpha / 2:
            return lo, k
        k += 1
        pmf *= lam / k


# ---------------------------------------------------------------------------------------------
# Philox words: the C++ and Triton generators against tcsm_kernels/philox.py

SEEDS_OFFSETS = [(0, 0), (1, 2), (2**40 + 123, 2**33 + 7), (2**63 - 1, 2**63 - 1),
                 (0xFFFFFFFF, 0x80000000)]


def _reference_words(seed, offset, rows):
    row = torch.arange(rows, dtype=torch.int64)
    zero = torch.zeros_like(row)
    counters = (row & philox.MASK32, row >> 32,
                zero + (offset & philox.MASK32), zero + (offset >> 32))
    return torch.stack(philox.philox4x32(seed, counters), dim=1)


@pytest.mark.parametrize("backend", FUSED)
def test_philox_words_match_reference(backend):
    rows = 16
    for seed, offset in SEEDS_OFFSETS:
        if backend == "cpp":
            words = torch.ops.tcsm.philox_row_words_cpu(seed, offset, rows)
        else:
            from tcsm_kernels.triton.philox import philox_row_words
            words = philox_row_words(seed, offset, rows, device_for(backend)).cpu()
        assert torch.equal(words, _reference_words(seed, offset, rows)), (seed, offset)


# ---------------------------------------------------------------------------------------------
# One batch of identical rows per backend, shared by the distribution and jump tests:
# V = 7 with mask_id = 2, T = 0.7; every 4th row holds a clean token, every 8th (from row 3)
# is a frozen masked row, the rest are masked and may jump with probability 0.4.

BATCH_LOGITS = torch.tensor([1.0, -0.5, 3.0, 0.2, 0.8, -0.6, 0.5])
BATCH_MASK = 2
BATCH_T = 0.7
BATCH_JUMP = 0.4
CLEAN_TOKEN = 4
_batches = {}


def batch_probs() -> torch.Tensor:
    scaled = BATCH_LOGITS.double() / BATCH_T
    scaled[BATCH_MASK] = float("-inf")
    return scaled.softmax(0)


def step_batch(backend):
    """(x, frozen, outputs) of one step over the shared batch, run once per backend."""
    if backend not in _batches:
        rows = rows_for(backend, 20000, 160)
        idx = torch.arange(rows)
        x = torch.where(idx % 4 == 0, CLEAN_TOKEN, BATCH_MASK)
        frozen = idx % 8 == 3
        logits = BATCH_LOGITS.expand(rows, -1)
        out = step(backend, logits, x, torch.tensor(BATCH_JUMP), mask_id=BATCH_MASK,
                   temperature=BATCH_T, frozen=frozen, seed=1234, offset=5)
        _batches[backend] = (x, frozen, out)
    return _batches[backend]


@pytest.mark.parametrize("backend", ALL)
def test_x1_chi_square(backend):
    """x1 ~ softmax(z / T) without the mask column: chi-square over the 6 participating
    columns (5 dof) below the Wilson-Hilferty 1e-4 quantile; the mask column is never drawn."""
    _, _, out = step_batch(backend)
    counts = torch.bincount(out.x1, minlength=7).double()
    assert counts[BATCH_MASK] == 0
    probs = batch_probs()
    keep = torch.arange(7) != BATCH_MASK
    expected = probs[keep] * out.x1.numel()
    assert expected.min() >= 5  # the chi-square approximation holds
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    assert chi2 < chi2_upper_quantile(5), chi2


@pytest.mark.parametrize("backend", ALL)
def test_jump_rate(backend):
    """Masked, unfrozen rows move with probability jump_prob: binomial count within
    3.89 standard deviations (+1 for continuity), a two-sided 1e-4 false-alarm rate."""
    x, frozen, out = step_batch(backend)
    eligible = (x == BATCH_MASK) & ~frozen
    n = int(eligible.sum())
    moved = int((out.x[eligible] != BATCH_MASK).sum())
    bound = 3.8906 * math.sqrt(n * BATCH_JUMP * (1 - BATCH_JUMP)) + 1
    assert abs(moved - n * BATCH_JUMP) <= bound, (moved, n)


@pytest.mark.parametrize("backend", ALL)
def test_only_masked_unfrozen_rows_change(backend):
    x, frozen, out = step_batch(backend)
    assert torch.equal(out.x[x != BATCH_MASK], x[x != BATCH_MASK])
    assert torch.equal(out.x[frozen], x[frozen])
    moved = out.x != x
    assert torch.equal(out.x[moved], out.x1[moved])
    assert not bool((out.x == BATCH_MASK)[moved].any())


@pytest.mark.parametrize("backend", FUSED)
def test_batch_tokens_match_reference(backend):
    """Same seeds, same tokens: the fused kernels reproduce the reference's draws."""
    x, _, out = step_batch(backend)
    _, _, ref = step_batch("reference")
    rows = x.numel()
    allowed = max(1, math.ceil(1e-3 * rows))  # as in test_agrees_with_reference
    assert int((out.x1 != ref.x1[:rows]).sum()) <= allowed
    assert int((out.x != ref.x[:rows]).sum()) <= allowed


# ---------------------------------------------------------------------------------------------
# Rare tokens: 24 columns of probability p each, 12 at the start of the vocabulary (drawn when
# u < 12 p) and 12 at the end (drawn when u > 1 - 12 p), so both ends of the uniform's range
# and of the CDF matter. 48 draws expected at each end; exact Poisson bounds, two-sided 1e-4.

RARE_COLUMNS = 24
RARE_EXPECTED_PER_END = 48.0


def _rare_rows(backend):
    if backend == "reference":
        return 200_000  # p = 2e-5 per rare column (the reference materialises float64 rows)
    return 4_000_000    # p = 1e-6 per rare column


@pytest.mark.parametrize("backend", _backend_params(["reference", "cpp"]) + [
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs many rows"))])
def test_rare_token_rate(backend):
    rows = _rare_rows(backend)
    p_rare = RARE_EXPECTED_PER_END / (12 * rows)
    probs = torch.full((32,), (1 - RARE_COLUMNS * p_rare) / 8, dtype=torch.float64)
    probs[:12] = p_rare
    probs[20:] = p_rare
    logits = probs.log().float()
    # Rates from the float32 logits actually passed.
    exact = logits.double().softmax(0)
    lam_start, lam_end = float(exact[:12].sum()) * rows, float(exact[20:].sum()) * rows
    out = step(backend, logits.expand(rows, -1), torch.zeros(rows, dtype=torch.int64),
               torch.tensor(0.0), seed=77, check=False)
    counts = torch.bincount(out.x1, minlength=32)
    for observed, lam in ((int(counts[:12].sum()), lam_start), (int(counts[20:].sum()), lam_end)):
        lo, hi = poisson_interval(lam)
        assert lo <= observed <= hi, (observed, lam, lo, hi)


# ---------------------------------------------------------------------------------------------
# Agreement with the reference on random inputs


def _random_case(shape, vocab, mask_id, dtype, generator):
    logits = (torch.randn(*shape, vocab, generator=generator) * 2.5).to(dtype)
    x = torch.randint(0, vocab, shape, generator=generator)
    if mask_id is not None:
        x = torch.where(torch.rand(shape, generator=generator) < 0.6, mask_id, x)
    jump = torch.rand(shape, generator=generator)
    frozen = torch.rand(shape[-1:], generator=generator) < 0.25  # e.g. prompt positions
    return logits, x, jump, frozen


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mask_id, dtype, temperature", [
    (7, torch.float32, 0.8), (None, torch.bfloat16, 1.0), (0, torch.float16, 1.3)])
def test_agrees_with_reference(backend, mask_id, dtype, temperature):
    """Tokens equal the reference's except where a uniform falls within float32 rounding of a
    CDF boundary (at most 0.1% of rows, at least one row allowed); confidence outputs agree to
    float32 accuracy."""
    g = torch.Generator().manual_seed(11)
    shape = (4, rows_for(backend, 512, 8))
    logits, x, jump, frozen = _random_case(shape, 300, mask_id, dtype, g)
    kwargs = dict(mask_id=mask_id, temperature=temperature, frozen=frozen, seed=99, offset=3)
    ref = step("reference", logits, x, jump, **kwargs)
    out = step(backend, logits, x, jump, **kwargs)
    assert out.x.shape == shape and out.x.dtype == torch.int64
    allowed = max(1, math.ceil(1e-3 * x.numel()))
    assert int((out.x1 != ref.x1).sum()) <= allowed
    assert int((out.x != ref.x).sum()) <= allowed
    same = out.x1 == ref.x1
    torch.testing.assert_close(out.prob[same], ref.prob[same], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.margin, ref.margin, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_agrees_with_reference_at_large_logits_over_temperature(backend):
    """Logits near -3000 at temperature 0.05 (|z| / T = 6e4, spread 0.2 / T): the weights come
    from (z - m) / T, whose difference is exact, so tokens still agree with the float64
    reference up to the 0.1% of test_agrees_with_reference. This guards the exponents' form:
    z / T - m / T as one fma with m / T rounded puts an ulp of 6e4 into every block's exponents
    and makes a large share of rows differ (docs/performance_history.md)."""
    g = torch.Generator().manual_seed(5)
    rows = rows_for(backend, 1024, 32)
    logits = torch.randn(rows, 1500, generator=g) * 0.01 - 3000.0
    x = torch.full((rows,), 1499, dtype=torch.long)
    jump = torch.ones(rows)
    kwargs = dict(mask_id=1499, temperature=0.05, seed=4, offset=1)
    ref = step("reference", logits, x, jump, **kwargs)
    out = step(backend, logits, x, jump, **kwargs)
    assert int((out.x1 != ref.x1).sum()) <= max(1, math.ceil(1e-3 * rows))


@pytest.mark.parametrize("backend", FUSED)
def test_strided_logits(backend):
    """A row-sliced view (row stride > V) and a transposed one (column stride != 1)."""
    g = torch.Generator().manual_seed(5)
    rows = rows_for(backend, 64, 6)
    wide = torch.randn(rows, 90, generator=g)
    x = torch.full((rows,), 3)
    jump = torch.ones(rows)
    ref = step("reference", wide[:, :70].contiguous(), x, jump, mask_id=3, seed=8)
    for view in (wide[:, :70], wide[:, :70].t().contiguous().t()):
        out = step(backend, view, x, jump, mask_id=3, seed=8)
        assert torch.equal(out.x1, ref.x1)


# ---------------------------------------------------------------------------------------------
# Semantics on every backend


@pytest.mark.parametrize("backend", ALL)
def test_reproducible_and_keyed_by_seed_and_offset(backend):
    g = torch.Generator().manual_seed(2)
    rows = rows_for(backend, 256, 12)
    logits = torch.randn(rows, 50, generator=g) * 0.3
    x = torch.zeros(rows, dtype=torch.int64)
    jump = torch.full((rows,), 0.5)
    first = step(backend, logits, x, jump, seed=5, offset=1)
    again = step(backend, logits, x, jump, seed=5, offset=1)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    # Nearly flat rows over 50 columns: two independent draws agree with probability ~0.02.
    for other in (dict(seed=6, offset=1), dict(seed=5, offset=2)):
        moved = step(backend, logits, x, jump, **other)
        assert float((moved.x1 == first.x1).double().mean()) < 0.3


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3, 2**63 - 1])
def test_seed_as_device_tensor_equals_int_seed(backend, seed):
    """A one-element int64 seed tensor (what a captured CUDA graph replays with) keys the same
    Philox stream as the int, on every backend, across both 32-bit halves of the key."""
    g = torch.Generator().manual_seed(4)
    rows = rows_for(backend, 64, 12)
    logits = torch.randn(rows, 40, generator=g)
    x = torch.full((rows,), 39, dtype=torch.int64)
    jump = torch.full((rows,), 0.5)
    from_int = step(backend, logits, x, jump, mask_id=39, seed=seed, offset=3)
    from_tensor = step(backend, logits, x, jump, mask_id=39, seed=torch.tensor([seed]), offset=3)
    for a, b in zip(from_int, from_tensor):
        assert torch.equal(a, b)


@pytest.mark.parametrize("seed, error, match", [
    (torch.tensor([1.0]), TypeError, "one-element int64"),
    (torch.tensor([1, 2]), TypeError, "one-element int64"),
    (torch.tensor(-1), ValueError, r"seed must be in \[0, 2\*\*63\)"),
    (torch.empty(1, dtype=torch.int64, device="meta"), ValueError, "seed is on meta"),
])
def test_bad_seed_tensor_raises(seed, error, match):
    with pytest.raises(error, match=match):
        ctmc_step(torch.randn(3, 5), torch.zeros(3, dtype=torch.int64), torch.tensor(0.5),
                  seed=seed, backend="reference")


@pytest.mark.parametrize("backend", ALL)
def test_jump_one_unmasks_every_masked_row(backend):
    g = torch.Generator().manual_seed(3)
    rows = rows_for(backend, 128, 16)
    logits = torch.randn(rows, 20, generator=g)
    x = torch.where(torch.arange(rows) % 3 == 0, 9, 19)
    out = step(backend, logits, x, torch.tensor(1.0), mask_id=19, seed=4)
    masked = x == 19
    assert torch.equal(out.x[masked], out.x1[masked])
    assert not bool((out.x == 19).any())
    assert torch.equal(out.x[~masked], x[~masked])


@pytest.mark.parametrize("backend", ALL)
def test_jump_zero_and_uniform_path(backend):
    g = torch.Generator().manual_seed(4)
    rows = rows_for(backend, 64, 8)
    logits = torch.randn(rows, 30, generator=g)
    x = torch.randint(0, 30, (rows,), generator=g)
    stay = step(backend, logits, x, torch.tensor(0.0), seed=1)
    assert torch.equal(stay.x, x)
    # Uniform path (no mask_id): any row may move, and with jump_prob = 1 every row does.
    move = step(backend, logits, x, torch.tensor(1.0), seed=1)
    assert torch.equal(move.x, move.x1)


@pytest.mark.parametrize("backend", ALL)
def test_low_temperature_is_argmax(backend):
    g = torch.Generator().manual_seed(6)
    rows = rows_for(backend, 64, 8)
    logits = torch.randn(rows, 40, generator=g)
    logits[:, 5] = 50.0  # the mask column would win if it were not excluded
    out = step(backend, logits, torch.full((rows,), 5), torch.tensor(1.0), mask_id=5,
               temperature=1e-3, seed=2)
    without_mask = logits.clone()
    without_mask[:, 5] = float("-inf")
    top2 = without_mask.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 0.05  # the runner-up has probability < e^-50
    assert torch.equal(out.x1[decided], without_mask.argmax(1)[decided])
    torch.testing.assert_close(out.prob[decided], torch.ones(int(decided.sum())))


@pytest.mark.parametrize("backend", ALL)
def test_single_participating_column(backend):
    """V = 2 with a mask: x1 is the other column, p(x1) = 1, margin 1 (top-2 = 0), entropy 0."""
    logits = torch.tensor([[0.3, -2.0], [5.0, 1.0]])
    out = step(backend, logits, torch.tensor([1, 1]), torch.tensor(1.0), mask_id=1)
    assert out.x1.tolist() == [0, 0] and out.x.tolist() == [0, 0]
    for value, expected in ((out.prob, 1.0), (out.margin, 1.0), (out.entropy, 0.0)):
        torch.testing.assert_close(value, torch.full((2,), expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("shape", [(0,), (2, 0), (0, 3)])
def test_empty(backend, shape):
    logits = torch.randn(*shape, 11)
    x = torch.zeros(shape, dtype=torch.int64)
    out = step(backend, logits, x, torch.tensor(0.5), mask_id=0)
    for value in out:
        assert value.shape == shape
    plain = ctmc_step(logits.to(device_for(backend)), x.to(device_for(backend)),
                      torch.tensor(0.5, device=device_for(backend)), backend=backend)
    assert isinstance(plain, torch.Tensor) and plain.shape == shape


def test_cpp_independent_of_thread_count():
    if "cpp" not in FUSED_HERE:
        pytest.skip("C++ extension unavailable")
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(97, 1000, generator=g)
    x = torch.full((97,), 4)
    jump = torch.rand(97, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = step("cpp", logits, x, jump, mask_id=4, seed=3)
        torch.set_num_threads(max(2, threads))
        many = step("cpp", logits, x, jump, mask_id=4, seed=3)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_triton_independent_of_block_size():
    if "triton" not in FUSED_HERE:
        pytest.skip("triton unavailable here")
    from tcsm_kernels.triton import ctmc_step as triton_step
    g = torch.Generator().manual_seed(9)
    rows, device = rows_for("triton", 256, 8), device_for("triton")
    logits = torch.randn(rows, 100, generator=g).to(device)
    x = torch.full((rows,), 4, device=device)
    jump = torch.rand(rows, generator=g).double().to(device)
    results = [triton_step.ctmc_step(logits, x, jump, None, 4, 0.9, 3, 0, block=block)
               for block in (16, 64, 128)]
    for other in results[1:]:
        assert torch.equal(other[0], results[0][0]) and torch.equal(other[1], results[0][1])
        for a, b in zip(other[2:], results[0][2:]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_unchecked_out_of_range_x_stays(backend):
    """check=False with x outside [0, V): no out-of-bounds access, the row keeps its x."""
    logits = torch.randn(3, 10)
    x = torch.tensor([10, -4, 2])
    out = step(backend, logits, x, torch.tensor(1.0), check=False)
    assert out.x.tolist() == [10, -4, out.x1[2].item()]
    assert bool(((out.x1 >= 0) & (out.x1 < 10)).all())


# ---------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument, before any kernel runs

V_BAD = 6


def _good():
    return dict(logits=torch.randn(4, V_BAD), x=torch.zeros(4, dtype=torch.int64),
                jump_prob=torch.tensor(0.5))


BAD_INPUTS = [
    (dict(logits=torch.zeros(4, V_BAD, dtype=torch.int64)), TypeError, "logits"),
    (dict(logits=torch.tensor(1.0)), ValueError, "logits"),
    (dict(logits=torch.full((4, V_BAD), float("nan"))), ValueError, "logits"),
    (dict(x=torch.zeros(5, dtype=torch.int64)), ValueError, "x"),
    (dict(x=torch.zeros(4)), TypeError, "x"),
    (dict(x=torch.full((4,), V_BAD)), ValueError, "x"),
    (dict(x=torch.full((4,), -1)), ValueError, "x"),
    (dict(x=torch.zeros(4, dtype=torch.int64, device="meta")), ValueError, "x"),
    (dict(jump_prob=torch.zeros(3)), ValueError, "jump_prob"),
    (dict(jump_prob=torch.tensor(1.5)), ValueError, "jump_prob"),
    (dict(jump_prob=torch.tensor(-0.1)), ValueError, "jump_prob"),
    (dict(jump_prob=torch.tensor(float("nan"))), ValueError, "jump_prob"),
    (dict(jump_prob=0.5), TypeError, "jump_prob"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(mask_id=V_BAD), ValueError, "mask_id"),
    (dict(mask_id=-1), ValueError, "mask_id"),
    (dict(mask_id=1.0), TypeError, "mask_id"),
    (dict(frozen=torch.zeros(4)), TypeError, "frozen"),
    (dict(frozen=torch.zeros(3, dtype=torch.bool)), ValueError, "frozen"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(offset=2**63), ValueError, "offset"),
    (dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("override, error, name", BAD_INPUTS,
                         ids=[f"{n}-{i}" for i, (_, _, n) in enumerate(BAD_INPUTS)])
def test_bad_input_raises(override, error, name):
    args = _good()
    args.update(override)
    logits, x, jump_prob = args.pop("logits"), args.pop("x"), args.pop("jump_prob")
    with pytest.raises(error, match=rf"^{name}\b"):
        ctmc_step(logits, x, jump_prob, **args)


def test_cpp_rejects_float64():
    if "cpp" not in FUSED_HERE:
        pytest.skip("C++ extension unavailable")
    with pytest.raises(TypeError, match="float64"):
        ctmc_step(torch.randn(2, 5, dtype=torch.float64), torch.zeros(2, dtype=torch.int64),
                  torch.tensor(0.5), backend="cpp")


def test_auto_float64_runs_reference():
    logits = torch.randn(6, 9, dtype=torch.float64)
    x = torch.full((6,), 2)
    kwargs = dict(mask_id=2, seed=4, return_x1=True)
    auto = ctmc_step(logits, x, torch.tensor(0.7), **kwargs)
    ref = reference.ctmc_step(logits, x, torch.tensor(0.7), **kwargs)
    assert torch.equal(auto.x, ref.x) and torch.equal(auto.x1, ref.x1)


# ---------------------------------------------------------------------------------------------
# torch.compile


def test_compile_fullgraph_cpp():
    if "cpp" not in FUSED_HERE:
        pytest.skip("C++ extension unavailable")
    torch._dynamo.reset()

    def sample(logits, x, jump):
        out = ctmc_step(logits * 2.0, x, jump, mask_id=0, seed=3, offset=1, backend="cpp",
                        return_confidence=True)
        return out.x, out.prob

    compiled = torch.compile(sample, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(3, 5, 17, generator=g)
    x = torch.zeros(3, 5, dtype=torch.int64)
    jump = torch.full((3, 5), 0.6)
    got, expected = compiled(logits, x, jump), sample(logits, x, jump)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_reference_backend_is_reference():
    assert _backend.resolve("reference", torch.device("cpu"), torch.float32) == "reference"
    logits = torch.randn(5, 8)
    x = torch.full((5,), 1)
    out = ctmc_step(logits, x, torch.tensor(0.5), mask_id=1, backend="reference", seed=2)
    assert torch.equal(out, reference.ctmc_step(logits, x, torch.tensor(0.5), mask_id=1, seed=2))


# ---------------------------------------------------------------------------------------------
# The Triton kernels as the GPU compiler sees them

HOPPER_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tcsm_kernels.triton import ctmc_step, philox

hopper = GPUTarget("cuda", 90, 32)
step_types = ["*{logits}", "i64", "*i64", "*fp64", "*i1", "*i64", "*i64", "*fp32", "*fp32",
              "*fp32", "i32", "i32", "fp32", "*i64", "u32", "i32", "i32", "i32", "constexpr",
              "constexpr", "constexpr"]
for logits, has_frozen, seed_tensor, block, warps in (("bf16", True, False, 2048, 8),
                                                      ("fp32", False, True, 16, 4)):
    types = [t.format(logits=logits) for t in step_types]
    signature = dict(zip(ctmc_step._ctmc_step_kernel.arg_names, types))
    source = ASTSource(fn=ctmc_step._ctmc_step_kernel, signature=signature,
                       constexprs={"HAS_FROZEN": has_frozen, "SEED_FROM_TENSOR": seed_tensor,
                                   "BLOCK": block})
    triton.compile(source, target=hopper, options={"num_warps": warps})
words = dict(zip(philox._row_words_kernel.arg_names, ["*i64", "i32", "u32", "i32", "i32"]))
triton.compile(ASTSource(fn=philox._row_words_kernel, signature=words), target=hopper)
"""


def test_triton_kernels_compile_for_hopper():
    """Compile the step and Philox kernels for sm_90 (H100/H200) without a GPU, in a fresh
    process (the interpreter replaces triton.jit in this one): catches what only the compiler
    rejects, such as non-constexpr globals or loop-carried type changes."""
    if not _backend.triton_available():
        pytest.skip("triton is not installed")
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-c", HOPPER_COMPILE], env=env, text=True,
                            capture_output=True, timeout=300, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize("backend", ["reference"] + backends_for("cpu"))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_one_bad_logit_raises_from_the_row_statistics(backend, bad, request):
    """Checked mode finds a single NaN/+inf logit from the (N,) outputs (no (N, V) pass); -inf
    is a legitimate 'never draw' logit and passes."""
    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    logits = torch.randn(3, 6, device=device)
    x = torch.zeros(3, dtype=torch.long, device=device)
    jump = torch.tensor(0.5, device=device)
    logits[1, 2] = bad
    with pytest.raises(ValueError, match="logits"):
        ctmc_step(logits, x, jump, mask_id=0, backend=backend)
    logits[1, 2] = float("-inf")
    out = ctmc_step(logits, x, jump, mask_id=0, backend=backend)
    assert out[1] != 2
