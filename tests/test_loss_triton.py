"""Triton TCSM loss kernel (tcsm_kernels/triton/loss.py) against the reference (math.md 4-5).

Runs compiled on CUDA, or through the Triton interpreter on CPU (conftest). Each case calls
``tcsm_loss_rows`` directly and compares the weighted row losses and the gradient with
``reference.tcsm_loss(..., reduction="none")`` and autograd of its sum. The truth is the
reference in float64 on the same (rounded) inputs; the kernel's error must be no larger than
the eager reference's own error (float32 math on those inputs) plus a small slack.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch

from tcsm_kernels import LossOptions, reference

from ._topk_cases import topk_distribution

loss_kernels = pytest.importorskip("tcsm_kernels.triton.loss")

IGNORE = -100
TEMPERATURE = 0.7
MAX_LOG_RATIO = 30.0
# Slack, relative to a row's largest value: float32 per the contract; for bf16/fp16 one ulp
# of that value (the interpreter rounds to bf16 by truncation, an eager op to nearest).
SLACK = {torch.float32: 1e-5, torch.bfloat16: torch.finfo(torch.bfloat16).eps,
         torch.float16: torch.finfo(torch.float16).eps}

# (target kind, divergence, objective, tail): every combination the op supports.
COMBOS = (
    [("data", d, "distrib", "zero") for d in ("kl", "is", "gkl")]
    + [("dense", d, "distrib", "zero") for d in ("kl", "is", "gkl")]
    + [("dense", d, "score", "zero") for d in ("is", "gkl")]
    + [("sparse", d, "score", t) for d in ("is", "gkl") for t in ("zero", "ignore")]
    + [("topk", d, "distrib", "zero") for d in ("kl", "is", "gkl")]
    + [("topk", "kl", "distrib", "renormalize")]
)
COMBO_IDS = ["-".join(c) for c in COMBOS]


def combos(*ids):
    """The named combinations, as pytest params."""
    return [pytest.param(COMBOS[COMBO_IDS.index(i)], id=i) for i in ids]


@dataclass
class Case:
    kind: str
    divergence: str
    objective: str
    tail: str
    mask_id: Optional[int]
    logits: torch.Tensor
    target: torch.Tensor
    weight: Optional[torch.Tensor]
    teacher: Optional[torch.Tensor] = None
    topk_indices: Optional[torch.Tensor] = None
    topk_values: Optional[torch.Tensor] = None


def make_case(combo, n, v, mask_id=None, dtype=torch.float32, scale=2.0, weighted=True, k=6,
              seed=0) -> Case:
    """Random rows with ignored rows, weight-0 rows and, for top-K, entries equal to the
    target, to mask_id and duplicated (far apart, so K > CHUNK_K puts them in other chunks)."""
    kind, divergence, objective, tail = combo
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=gen) * scale
    target = torch.randint(0, v, (n,), generator=gen)
    if mask_id is not None:
        target[target == mask_id] = (mask_id + 1) % v
    target[1::4] = IGNORE
    weight = None
    if weighted:
        weight = torch.rand(n, generator=gen) * 1.5 + 0.25
        weight[2::7] = 0.0
    case = Case(kind, divergence, objective, tail, mask_id, logits.to(dtype), target, weight)
    if kind == "dense":
        teacher = logits + torch.randn(n, v, generator=gen) * scale / 2
        case.teacher = teacher.to(dtype)
    if kind == "sparse":
        k = min(k, v)
        idx = torch.randint(0, v, (n, k), generator=gen)
        idx[:, 0] = target.clamp(min=0)
        if k >= 3:
            idx[:, k - 1] = idx[:, 1]
        if mask_id is not None and k >= 4:
            idx[:, 2] = mask_id
        case.topk_indices = idx
        case.topk_values = torch.randn(n, k, generator=gen) * scale
    if kind == "topk":
        case.topk_indices, case.topk_values = topk_distribution(logits, k, mask_id, gen)
    return case


def run_reference(case: Case, float64: bool):
    """(weighted row losses, gradient) of reference.tcsm_loss; float64 math if asked."""
    logits = (case.logits.double() if float64 else case.logits).clone().requires_grad_()
    teacher = case.teacher
    topk = None
    if case.topk_indices is not None:
        topk = (case.topk_indices, case.topk_values)
    if float64:
        teacher = None if teacher is None else teacher.double()
        topk = None if topk is None else (topk[0], topk[1].double())
    weight = None if case.weight is None else (case.weight.double() if float64 else case.weight)
    loss = reference.tcsm_loss(
        logits, case.target, teacher_logits=teacher, teacher_topk=topk,
        divergence=case.divergence, objective=case.objective, weight=weight,
        mask_id=case.mask_id, temperature=TEMPERATURE, reduction="none", ignore_index=IGNORE,
        tail=case.tail, max_log_ratio=MAX_LOG_RATIO)
    loss.sum().backward()
    return loss.detach(), logits.grad


def options(case: Case) -> LossOptions:
    return LossOptions(divergence=case.divergence, objective=case.objective, tail=case.tail,
                       mask_id=case.mask_id, temperature=TEMPERATURE, ignore_index=IGNORE,
                       max_log_ratio=MAX_LOG_RATIO)


def run_kernel(case: Case, device: str, inplace: bool = False):
    """(row losses, gradient) of tcsm_loss_rows on `device`, returned on the CPU."""
    def dev(t):
        return None if t is None else t.to(device)

    logits = dev(case.logits).clone()
    grad = logits if inplace else torch.full_like(logits, float("nan"))
    loss, _ = loss_kernels.tcsm_loss_rows(
        logits, dev(case.target), dev(case.weight), None, dev(case.teacher),
        dev(case.topk_indices), dev(case.topk_values), grad, options(case))
    return loss.cpu(), grad.cpu()


def assert_no_worse(actual, eager, truth, slack, what):
    """Per row: max |actual - truth| <= 2 max |eager - truth| + slack * max |truth|.

    A value beyond the range of the gradient dtype (fp16 tops out at 65504) is inf in the
    kernel exactly where it is inf in the eager reference; such entries are not compared."""
    actual, eager, truth = (t.double().reshape(truth.shape[0], -1) for t in (actual, eager, truth))
    overflow = torch.isinf(eager)
    assert torch.equal(torch.isfinite(actual), ~overflow), f"{what}: unexpected non-finite values"
    assert torch.equal(actual[overflow], eager[overflow]), f"{what}: overflow of another sign"
    actual, eager, truth = (torch.where(overflow, 0.0, t) for t in (actual, eager, truth))
    err = (actual - truth).abs().amax(1)
    bound = 2 * (eager - truth).abs().amax(1) + slack * truth.abs().amax(1)
    bad = err > bound
    assert not bad.any(), (f"{what}: rows {bad.nonzero().flatten().tolist()[:5]} err "
                           f"{err[bad][:5].tolist()} > bound {bound[bad][:5].tolist()}")


def check_against_reference(case: Case, device: str):
    loss, grad = run_kernel(case, device)
    truth_loss, truth_grad = run_reference(case, float64=True)
    eager_loss, eager_grad = run_reference(case, float64=False)
    slack = SLACK[case.logits.dtype]
    assert loss.dtype == torch.float32 and grad.dtype == case.logits.dtype
    assert_no_worse(loss, eager_loss, truth_loss, slack, "loss")
    assert_no_worse(grad, eager_grad, truth_grad, slack, "grad")
    dead = case.target == IGNORE
    if case.weight is not None:
        dead |= case.weight == 0
    assert (loss[dead] == 0).all() and (grad[dead] == 0).all()
    if case.mask_id is not None:
        assert (grad[:, case.mask_id] == 0).all()


@pytest.mark.parametrize("mask_id", [None, 0, 40], ids=["nomask", "mask0", "masklast"])
@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
def test_matches_reference(triton_device, combo, mask_id):
    n = 37 if mask_id == 40 else 13  # the interpreter is slow: N = 37 once per combination
    check_against_reference(make_case(combo, n, 41, mask_id), triton_device)


@pytest.mark.parametrize("n, v, mask_id, k", [(5, 1, None, 1), (1, 7, 0, 6), (3, 1000, 999, 100)],
                         ids=["V1", "V7-N1", "V1000-K100"])
@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
def test_vocab_sizes_unweighted(triton_device, combo, n, v, mask_id, k):
    # Interpreted, V = 1000 spans four 256-column blocks, the last one partial and holding the
    # mask column; K = 100 is matched for duplicates in four chunks of 32.
    check_against_reference(make_case(combo, n, v, mask_id, weighted=False, k=k),
                            triton_device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
def test_low_precision(triton_device, combo, dtype):
    check_against_reference(make_case(combo, 11, 41, 3, dtype=dtype), triton_device)


@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
def test_extreme_logits(triton_device, combo):
    # |z| ~ 1e4: every ratio exponent clamps at max_log_ratio; no NaN, same values.
    check_against_reference(make_case(combo, 6, 41, 5, scale=1e4), triton_device)


@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
def test_inplace_grad_matches_out_of_place(triton_device, combo):
    case = make_case(combo, 9, 41, 0)
    loss, grad = run_kernel(case, triton_device)
    loss_inplace, grad_inplace = run_kernel(case, triton_device, inplace=True)
    assert torch.equal(loss, loss_inplace) and torch.equal(grad, grad_inplace)


@pytest.mark.parametrize("kind", ["data", "dense", "sparse"])
def test_no_rows(triton_device, kind):
    combo = next(c for c in COMBOS if c[0] == kind and c[1] == "gkl")
    case = make_case(combo, 0, 7)
    loss, grad = run_kernel(case, triton_device)
    assert loss.shape == (0,) and loss.dtype == torch.float32 and grad.shape == (0, 7)


@pytest.mark.parametrize("combo", combos(
    "data-gkl-distrib-zero", "dense-gkl-distrib-zero", "dense-is-score-zero",
    "sparse-gkl-score-zero", "sparse-is-score-ignore"))
def test_bad_ids_give_nan_row_and_zero_grad(triton_device, combo):
    """A live row whose target (or top-K id) is not a valid column: NaN loss, zero gradient,
    nothing read out of bounds; other rows unaffected."""
    v = 41
    case = make_case(combo, 8, v, mask_id=0)
    bad_rows = [0, 3, 4, 6]
    case.target[0] = v
    case.target[3] = 2 ** 40
    case.target[4] = 0  # the mask column
    case.target[6] = -7
    if case.topk_indices is not None:
        bad_rows.append(7)
        case.topk_indices[7, 4] = 2 ** 40
    loss, grad = run_kernel(case, triton_device)
    clean = make_case(combo, 8, v, mask_id=0)
    clean.target[bad_rows] = IGNORE
    clean_loss, clean_grad = run_kernel(clean, triton_device)
    good = torch.ones(8, dtype=torch.bool)
    good[bad_rows] = False
    live_bad = torch.tensor([case.weight[r] != 0 for r in bad_rows])
    assert torch.isnan(loss[bad_rows][live_bad]).all()
    assert (loss[bad_rows][~live_bad] == 0).all()
    assert (grad[bad_rows] == 0).all()
    assert torch.equal(loss[good], clean_loss[good]) and torch.equal(grad[good], clean_grad[good])


@pytest.mark.parametrize("combo", combos("dense-gkl-distrib-zero", "sparse-gkl-score-zero"))
def test_strided_rows_and_broadcast_weight(triton_device, combo):
    """Row-contiguous views with a row stride > V (logits, teacher, grad), a strided target and
    top-K, and a stride-0 (broadcast) weight."""
    n, v = 6, 41
    case = make_case(combo, n, v, mask_id=7)
    case.weight = torch.full((1,), 0.75).expand(n)
    truth_loss, truth_grad = run_reference(case, float64=True)
    eager_loss, eager_grad = run_reference(case, float64=False)

    def padded(t, extra):
        """A view of t inside a wider buffer: row stride = t's width + extra."""
        wide = torch.zeros(t.shape[0], t.shape[1] + extra, dtype=t.dtype, device=triton_device)
        wide[:, 1:1 + t.shape[1]] = t.to(triton_device)
        return wide[:, 1:1 + t.shape[1]]

    logits = padded(case.logits, 5)
    grad_buffer = torch.full((n, v + 9), 5.0, device=triton_device)
    grad = grad_buffer[:, 2:2 + v]
    target = torch.stack([case.target, case.target], 1).to(triton_device)[:, 0]
    teacher = None if case.teacher is None else padded(case.teacher, 2)
    idx = ratios = None
    if case.topk_indices is not None:
        k = case.topk_indices.shape[1]
        idx = torch.zeros(n, 2 * k, dtype=torch.int64, device=triton_device)[:, ::2]
        idx.copy_(case.topk_indices)
        ratios = padded(case.topk_values, 1)
    assert logits.stride(0) == v + 5 and target.stride(0) == 2 and grad.stride(0) == v + 9
    loss, _ = loss_kernels.tcsm_loss_rows(
        logits, target, case.weight.to(triton_device), None, teacher, idx, ratios, grad,
        replace(options(case), mask_id=7))
    assert_no_worse(loss.cpu(), eager_loss, truth_loss, SLACK[torch.float32], "loss")
    assert_no_worse(grad.cpu(), eager_grad, truth_grad, SLACK[torch.float32], "grad")
    outside = grad_buffer.cpu().clone()
    outside[:, 2:2 + v] = 5.0
    assert (outside == 5.0).all()
