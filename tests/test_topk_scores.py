"""Top-k concrete scores (tcsm_kernels/ops/topk_scores.py, docs/math.md 6) on every backend.

Backends: "reference" (stable sort + gather + logsumexp, the oracle), "cpp" (the CPU kernel)
and "triton" (compiled on CUDA, else the Triton interpreter on CPU, about a second per row:
there the grid shrinks to float32 with V <= 1000 and k = V only up to V = 41, plus bfloat16 and
float16 at V = 41, with one row per logit pattern). Indices must match the reference exactly,
ties included (integer-valued logits: lower index first); log-ratios and the LSE to float32
rounding.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tcsm_kernels import _backend, reference
from tcsm_kernels.ops.loss import fused_tcsm_loss
from tcsm_kernels.ops.topk_scores import topk_concrete_scores

from .conftest import HAS_CUDA, backends_for

FUSED_HERE = backends_for("cpu")
FUSED = [pytest.param(name, marks=pytest.mark.skipif(name not in FUSED_HERE,
                                                     reason=f"backend {name} unavailable"))
         for name in ("cpp", "triton")]
INTERPRETED = not HAS_CUDA
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def device_for(backend: str) -> str:
    return "cuda" if backend == "triton" and HAS_CUDA else "cpu"


def teacher(rows: int, vocab: int, pattern: str, dtype=torch.float32, seed: int = 0):
    """Logits of a pattern: "normal" (scaled), or "ties" (integers in [-3, 3]: many equal
    values, so order among ties is tested)."""
    g = torch.Generator().manual_seed(seed + vocab)
    if pattern == "ties":
        u = torch.randint(-3, 4, (rows, vocab), generator=g).float()
    else:
        u = 3.0 * torch.randn(rows, vocab, generator=g)
    return u.to(dtype)


def run(backend, u, target, k, **kwargs):
    """topk_concrete_scores on the backend's device, results back on the CPU."""
    device = device_for(backend)
    moved = {name: value.to(device) if isinstance(value, torch.Tensor) else value
             for name, value in kwargs.items()}
    out = topk_concrete_scores(u.to(device), target.to(device), k, backend=backend, **moved)
    return tuple(t.cpu() for t in out)


def assert_matches_reference(got, u, target, k, **kwargs):
    indices, log_ratios, lse = got
    ref_indices, ref_log_ratios, ref_lse = reference.topk_concrete_scores(
        u, target, k, backend="reference", check=False, **kwargs)
    assert indices.dtype == torch.int64 and log_ratios.dtype == lse.dtype == torch.float32
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(log_ratios, ref_log_ratios, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-6, atol=2e-6, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Three-way agreement

GRID = [(vocab, k) for vocab in (1, 7, 41, 1000, 50258) for k in sorted({1, 3, vocab})
        if k <= vocab]


def interpreter_skips(dtype, vocab, k):
    """The reduced grid of the Triton interpreter (module docstring)."""
    if vocab > 1000 or (k == vocab and vocab > 41):
        return True
    return dtype != torch.float32 and vocab != 41


@pytest.mark.parametrize("vocab, k", GRID, ids=[f"V{v}-k{k}" for v, k in GRID])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", FUSED)
def test_agrees_with_reference(backend, dtype, vocab, k):
    interpreted = backend == "triton" and INTERPRETED
    if interpreted and interpreter_skips(dtype, vocab, k):
        pytest.skip("outside the Triton interpreter's reduced grid")
    rows_per_pattern = 1 if interpreted else 4
    u = torch.cat([teacher(rows_per_pattern, vocab, pattern, dtype)
                   for pattern in ("normal", "ties")])
    target = torch.randint(0, vocab, (u.shape[0],), generator=torch.Generator().manual_seed(1))
    assert_matches_reference(run(backend, u, target, k), u, target, k)


@pytest.mark.parametrize("temperature, correction_width", [(0.5, "V"), (2.0, "k"), (0.7, "none")])
@pytest.mark.parametrize("backend", FUSED)
def test_temperature_and_correction(backend, temperature, correction_width):
    batch, vocab, k = (2, 2), 41, 5
    u = teacher(4, vocab, "normal").reshape(*batch, vocab)
    target = torch.randint(0, vocab, batch, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    width = {"V": vocab, "k": k, "none": None}[correction_width]
    correction = None if width is None else torch.randn(*batch, width, generator=g)
    got = run(backend, u, target, k, temperature=temperature, correction=correction)
    assert got[0].shape == got[1].shape == batch + (k,) and got[2].shape == batch
    assert_matches_reference(got, u, target, k, temperature=temperature, correction=correction)


@pytest.mark.parametrize("backend", FUSED)
def test_full_width_correction_is_read_by_column(backend):
    """k = V: a (..., V) correction is indexed by column (the two shapes coincide)."""
    u = teacher(4, 7, "ties")
    target = torch.tensor([0, 6, 3, 3])
    correction = torch.arange(28, dtype=torch.float64).reshape(4, 7)
    got = run(backend, u, target, 7, correction=correction)
    assert_matches_reference(got, u, target, 7, correction=correction)
    expected = (u.gather(1, got[0]) - u.gather(1, target[:, None])) + correction.float().gather(
        1, got[0])
    torch.testing.assert_close(got[1], expected)


@pytest.mark.parametrize("backend", FUSED)
def test_int32_target_and_strided_rows(backend):
    u = teacher(3, 82, "normal")[:, ::2]  # column stride 2: copied to unit stride first
    target = torch.randint(0, 41, (3,), dtype=torch.int32)
    assert_matches_reference(run(backend, u, target, 3), u, target.long(), 3)


@pytest.mark.parametrize("shape", [(0, 9), (2, 0, 9)])
@pytest.mark.parametrize("backend", FUSED)
def test_no_rows(backend, shape):
    u = torch.randn(shape)
    target = torch.zeros(shape[:-1], dtype=torch.int64)
    indices, log_ratios, lse = run(backend, u, target, 4)
    assert indices.shape == log_ratios.shape == shape[:-1] + (4,)
    assert lse.shape == shape[:-1]


@pytest.mark.parametrize("backend", FUSED)
def test_unchecked_bad_target_gives_nan_row(backend):
    u = teacher(3, 41, "normal")
    target = torch.tensor([2, 41, -5])
    indices, log_ratios, lse = run(backend, u, target, 3, check=False)
    ref = reference.topk_concrete_scores(u, torch.tensor([2, 0, 0]), 3)
    assert torch.equal(indices, ref[0]) and torch.allclose(lse, ref[2])
    torch.testing.assert_close(log_ratios[0], ref[1][0])
    assert torch.isnan(log_ratios[1:]).all()


@pytest.mark.parametrize("backend", FUSED)
def test_unchecked_special_values_order_like_torch_sort(backend):
    """NaN first, then +inf, ..., -0 and +0 tied (lower index first), -inf last."""
    row = torch.tensor([0.0, float("-inf"), -0.0, float("nan"), 1.0, float("inf"), -2.0, 0.0])
    u = row[None].repeat(2, 1)
    target = torch.tensor([4, 6])
    got = run(backend, u, target, 8, check=False)
    assert_matches_reference(got, u, target, 8)


@pytest.mark.parametrize("backend", FUSED)
def test_all_neg_inf_row(backend):
    u = torch.full((2, 9), float("-inf"))
    u[1, 4] = 0.5
    got = run(backend, u, torch.tensor([0, 4]), 3, check=False)
    assert torch.equal(got[0][0], torch.tensor([0, 1, 2])) and got[2][0] == float("-inf")
    assert_matches_reference(got, u, torch.tensor([0, 4]), 3)


def test_triton_large_k_uses_sort():
    if "triton" not in FUSED_HERE:
        pytest.skip("triton unavailable")
    from tcsm_kernels.triton import topk_scores as triton_topk
    vocab = 1100
    k = triton_topk.MAX_K + 1
    u = teacher(2, vocab, "ties")
    target = torch.tensor([0, vocab - 1])
    assert_matches_reference(run("triton", u, target, k, temperature=0.3), u, target, k,
                             temperature=0.3)


def test_float64_runs_reference():
    u = torch.randn(4, 30, dtype=torch.float64)
    target = torch.arange(4)
    got = topk_concrete_scores(u, target, 5, temperature=1.5)
    ref = reference.topk_concrete_scores(u, target, 5, temperature=1.5)
    assert got[1].dtype == torch.float64
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_reference_backend_is_reference():
    u = teacher(3, 20, "ties")
    target = torch.tensor([1, 2, 3])
    got = topk_concrete_scores(u, target, 4, backend="reference")
    ref = reference.topk_concrete_scores(u, target, 4)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


# ---------------------------------------------------------------------------------------------
# Bad input

V_BAD = 6


def _good():
    return dict(teacher_logits=torch.randn(4, V_BAD), target=torch.zeros(4, dtype=torch.int64),
                k=2)


BAD_INPUTS = [
    (dict(teacher_logits=torch.zeros(4, V_BAD, dtype=torch.int64)), TypeError, "teacher_logits"),
    (dict(teacher_logits=torch.tensor(1.0)), ValueError, "teacher_logits"),
    (dict(teacher_logits=torch.zeros(4, 0)), ValueError, "teacher_logits"),
    (dict(teacher_logits=torch.full((4, V_BAD), float("nan"))), ValueError, "teacher_logits"),
    (dict(target=torch.zeros(5, dtype=torch.int64)), ValueError, "target"),
    (dict(target=torch.zeros(4)), TypeError, "target"),
    (dict(target=torch.full((4,), V_BAD)), ValueError, "target"),
    (dict(target=torch.full((4,), -1)), ValueError, "target"),
    (dict(target=torch.zeros(4, dtype=torch.int64, device="meta")), ValueError, "target"),
    (dict(k=0), ValueError, "k"),
    (dict(k=V_BAD + 1), ValueError, "k"),
    (dict(k=2.0), TypeError, "k"),
    (dict(k=True), TypeError, "k"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(correction=torch.zeros(4, 3)), ValueError, "correction"),
    (dict(correction=torch.zeros(4, V_BAD, dtype=torch.int64)), TypeError, "correction"),
    (dict(correction=torch.full((4, 2), float("inf"))), ValueError, "correction"),
    (dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("override, error, name", BAD_INPUTS,
                         ids=[f"{n}-{i}" for i, (_, _, n) in enumerate(BAD_INPUTS)])
def test_bad_input_raises(override, error, name):
    args = _good()
    args.update(override)
    with pytest.raises(error, match=rf"^{name}\b"):
        topk_concrete_scores(args.pop("teacher_logits"), args.pop("target"), args.pop("k"),
                             **args)


def test_cpp_rejects_float64():
    if "cpp" not in FUSED_HERE:
        pytest.skip("C++ extension unavailable")
    with pytest.raises(TypeError, match="float64"):
        topk_concrete_scores(torch.randn(2, 5, dtype=torch.float64),
                             torch.zeros(2, dtype=torch.int64), 2, backend="cpp")


# ---------------------------------------------------------------------------------------------
# torch.compile and the loss it feeds


def test_compile_fullgraph_cpp():
    if "cpp" not in FUSED_HERE:
        pytest.skip("C++ extension unavailable")
    torch._dynamo.reset()

    def scores(u, target, correction):
        indices, log_ratios, lse = topk_concrete_scores(u * 2.0, target, 4, temperature=0.5,
                                                        correction=correction, backend="cpp")
        return indices, log_ratios + 1.0, lse

    compiled = torch.compile(scores, fullgraph=True, backend="aot_eager")
    u = teacher(6, 33, "ties").reshape(2, 3, 33)
    target = torch.randint(0, 33, (2, 3), generator=torch.Generator().manual_seed(4))
    correction = torch.randn(2, 3, 4)
    got, expected = compiled(u, target, correction), scores(u, target, correction)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("backend", ["reference"] + [p.values[0] for p in FUSED])
def test_feeds_fused_topk_loss(backend):
    if backend != "reference" and backend not in FUSED_HERE:
        pytest.skip(f"backend {backend} unavailable")
    rows, vocab, k = 4, 41, 6
    g = torch.Generator().manual_seed(5)
    u = torch.randn(rows, vocab, generator=g)
    logits = torch.randn(rows, vocab, generator=g, requires_grad=True)
    target = torch.randint(0, vocab, (rows,), generator=g)
    indices, log_ratios, _ = run(backend, u, target, k)
    loss = fused_tcsm_loss(logits, target, teacher_topk=(indices, log_ratios), divergence="gkl",
                           objective="score")
    expected = reference.tcsm_loss(logits, target, teacher_topk=(indices, log_ratios),
                                   divergence="gkl", objective="score")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------------
# The Triton kernel as the GPU compiler sees it

HOPPER_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tcsm_kernels.triton import topk_scores

hopper = GPUTarget("cuda", 90, 32)
types = ["*{logits}", "i64", "*i64", "*i64", "*fp32", "*fp32", "i32", "i32", "fp32",
         "constexpr", "constexpr"]
k_pad, block = topk_scores.launch_sizes(128256, 64)
kernel = topk_scores._topk_scores_kernel
signature = dict(zip(kernel.arg_names, [t.format(logits="bf16") for t in types]))
source = ASTSource(fn=kernel, signature=signature, constexprs={"BLOCK": block, "K_PAD": k_pad})
triton.compile(source, target=hopper, options={"num_warps": 8})
"""


def test_triton_kernel_compiles_for_hopper():
    """Compile the kernel for sm_90 (H100/H200) without a GPU, in a fresh process (the
    interpreter replaces triton.jit in this one)."""
    if not _backend.triton_available():
        pytest.skip("triton is not installed")
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-c", HOPPER_COMPILE], env=env, text=True,
                            capture_output=True, timeout=300, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-4000:]
