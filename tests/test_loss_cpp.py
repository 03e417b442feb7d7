"""The C++ loss kernel tcsm::tcsm_loss_cpu against the reference (docs/math.md 4-5), called
directly.

Each case compares the weighted per-row losses and the gradient rows with
``reference.tcsm_loss(reduction="none")`` and autograd of its sum, computed in float64 on the
same (rounded) inputs. float32 must agree to ~1e-5 of the row's scale; bfloat16/float16 may be
no worse than the eager float32 reference on the same inputs plus one rounding step.
"""
import itertools

import pytest
import torch

import tcsm_kernels  # noqa: F401  (loads the extension that registers tcsm::*)
from tcsm_kernels import _backend, reference

from ._topk_cases import topk_distribution

pytestmark = pytest.mark.skipif(
    not _backend.cpp_available(),
    reason="C++ extension tcsm_kernels._C is not built (python setup.py build_ext --inplace)")

IGNORE = -100

# (target kind, divergence, objective, tail): every combination the reference supports.
CONFIGS = (
    [("data", d, "distrib", "zero") for d in ("kl", "is", "gkl")]
    + [("dense", d, "distrib", "zero") for d in ("kl", "is", "gkl")]
    + [("dense", d, "score", "zero") for d in ("is", "gkl")]
    + [("sparse", d, "score", t) for d in ("is", "gkl") for t in ("zero", "ignore")]
    + [("topk", d, "distrib", "zero") for d in ("kl", "is", "gkl")]
    + [("topk", "kl", "distrib", "renormalize")]
)


def config_id(config):
    return "-".join(config)


def make_case(kind, n, v, mask_id, dtype=torch.float32, scale=3.0, k=6, seed=0):
    """Random rows: logits, targets (some ignored, never the mask), weights (some 0), teacher."""
    gen = torch.Generator().manual_seed(seed + 1000 * v + n)
    logits = (torch.randn(n, v, generator=gen, dtype=torch.float64) * scale).to(dtype)
    allowed = torch.tensor([c for c in range(v) if c != mask_id], dtype=torch.int64)
    target = allowed[torch.randint(len(allowed), (n,), generator=gen)]
    target[torch.rand(n, generator=gen) < 0.2] = IGNORE
    weight = torch.rand(n, generator=gen, dtype=torch.float32) * 2
    weight[torch.rand(n, generator=gen) < 0.15] = 0
    case = dict(logits=logits, target=target, weight=weight, teacher=None, topk=None)
    if kind == "dense":
        case["teacher"] = (torch.randn(n, v, generator=gen, dtype=torch.float64) * scale).to(dtype)
    if kind == "sparse":
        k = min(k, v)
        idx = torch.randint(v, (n, k), generator=gen)
        if n and k >= 3:  # entries equal to the target and to the mask column are skipped
            idx[::2, 0] = target[::2].clamp(min=0)
            if mask_id is not None:
                idx[1::3, 1] = mask_id
            idx[::4, 2] = idx[::4, 1]  # duplicates each count
        case["topk"] = (idx, torch.randn(n, k, generator=gen, dtype=torch.float32) * 2)
    if kind == "topk":
        case["topk"] = topk_distribution(logits.float(), k, mask_id, gen)
    return case


def run_kernel(case, divergence, objective, tail, mask_id=None, temperature=1.0,
               max_log_ratio=30.0, grad=None, logits=None):
    logits = case["logits"] if logits is None else logits
    grad = torch.empty_like(logits) if grad is None else grad
    idx, ratios = case["topk"] if case["topk"] is not None else (None, None)
    loss, _ = torch.ops.tcsm.tcsm_loss_cpu(
        logits, case["target"], case["weight"], None, case["teacher"], idx, ratios, grad,
        divergence, objective, tail, -1 if mask_id is None else mask_id, temperature, IGNORE,
        max_log_ratio, 0.0, 0.0, 0.0, False)
    return loss, grad


def run_reference(case, divergence, objective, tail, mask_id=None, temperature=1.0,
                  max_log_ratio=30.0, dtype=torch.float64):
    """Weighted row losses and their gradient; math in float64 (or float32 for other dtypes)."""
    logits = case["logits"].to(dtype).requires_grad_(True)
    teacher = None if case["teacher"] is None else case["teacher"].to(dtype)
    loss = reference.tcsm_loss(
        logits, case["target"], teacher_logits=teacher, teacher_topk=case["topk"],
        divergence=divergence, objective=objective, weight=case["weight"], mask_id=mask_id,
        temperature=temperature, reduction="none", ignore_index=IGNORE, tail=tail,
        max_log_ratio=max_log_ratio)
    if loss.numel() == 0:
        return loss.detach(), torch.zeros_like(logits)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    return loss.detach(), grad


def row_scale(grad):
    """Per-row size of the gradient, the yardstick of its absolute error."""
    return grad.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)


def row_error(grad, truth):
    return (grad.double() - truth).abs().amax(dim=1, keepdim=True)


def assert_float32_close(case, loss, grad, truth, rtol=1e-5, **options):
    """Within rtol of the row's scale, or no worse than twice the eager float32 reference
    where the row itself is ill-conditioned in float32 (e.g. 1 - p_a for p_a near 1). The
    gradient's scale is floored at weight / 100: p - q with p, q near 1 cannot be closer than
    about 1e-7 (fast_exp is accurate to 2 ulp)."""
    truth_loss, truth_grad = truth
    eager_loss, eager_grad = run_reference(case, dtype=torch.float32, **options)
    loss_err = (loss.double() - truth_loss).abs()
    eager_loss_err = (eager_loss.double() - truth_loss).abs()
    loss_ok = loss_err <= rtol * (1 + truth_loss.abs()) + 2 * eager_loss_err
    assert bool(loss_ok.all()), f"loss error {loss_err.max().item():.3g}"
    grad_err = row_error(grad, truth_grad)
    scale = torch.maximum(row_scale(truth_grad), case["weight"].abs()[:, None].double() / 100)
    grad_ok = grad_err <= rtol * scale + 2 * row_error(eager_grad, truth_grad)
    assert bool(grad_ok.all()), (
        f"grad error {(grad_err / row_scale(truth_grad)).max().item():.3g} of the row scale")


def assert_zero_rows(case, loss, grad):
    """Ignored and weight-0 rows: loss 0 and gradient exactly 0."""
    off = (case["target"] == IGNORE) | (case["weight"] == 0)
    assert bool((loss[off] == 0).all())
    assert bool((grad[off] == 0).all())


def config_cases():
    """float32 grid: configs x V x N x mask column (none, first, last, inside), plus
    temperature != 1 with a small clamp so that max_log_ratio takes effect."""
    shapes = [(v, 37, mask_id) for v in (1, 7, 41, 1000)
              for mask_id in ([None] if v == 1 else [None, 0, v - 1, v // 2])]
    shapes += [(1, 1, None), (7, 1, 3), (1000, 1, None), (41, 0, None)]
    for config, (v, n, mask_id) in itertools.product(CONFIGS, shapes):
        yield pytest.param(config, v, n, mask_id, 1.0, 30.0,
                           id=f"{config_id(config)}-V{v}-N{n}-mask{mask_id}")
    for config, v in itertools.product(CONFIGS, (7, 41, 1000)):
        yield pytest.param(config, v, 37, 3, 0.7, 2.0, id=f"{config_id(config)}-V{v}-tau-clamp")


@pytest.mark.parametrize("config,v,n,mask_id,temperature,max_log_ratio", list(config_cases()))
def test_float32_matches_reference(config, v, n, mask_id, temperature, max_log_ratio):
    kind, divergence, objective, tail = config
    case = make_case(kind, n, v, mask_id)
    options = dict(mask_id=mask_id, temperature=temperature, max_log_ratio=max_log_ratio)
    loss, grad = run_kernel(case, divergence, objective, tail, **options)
    truth = run_reference(case, divergence, objective, tail, **options)
    assert loss.shape == (n,) and loss.dtype == torch.float32
    assert_float32_close(case, loss, grad, truth, divergence=divergence, objective=objective,
                         tail=tail, **options)
    assert_zero_rows(case, loss, grad)
    if mask_id is not None:
        assert bool((grad[:, mask_id] == 0).all())


@pytest.mark.parametrize("divergence", ["kl", "is", "gkl"])
@pytest.mark.parametrize("scale,temperature", [(3.0, 1.0), (3.0, 0.7), (25.0, 1.0)],
                         ids=["shared-exp", "shared-exp-tau", "wide-logits"])
def test_dense_distrib_pass_one_paths(divergence, scale, temperature):
    """Dense distrib rows over several column blocks (V = 1700, blocks of 512): pass 1 takes the
    teacher's exp from the student's and the ratio's while s_z + s_x - s_u <= 40 (logits of
    scale 3), its own exp beyond (scale 25); pass 2 rescales the stashed exps per block."""
    case = make_case("dense", 37, 1700, 800, scale=scale)
    options = dict(mask_id=800, temperature=temperature)
    loss, grad = run_kernel(case, divergence, "distrib", "zero", **options)
    truth = run_reference(case, divergence, "distrib", "zero", **options)
    assert_float32_close(case, loss, grad, truth, divergence=divergence, objective="distrib",
                         tail="zero", **options)
    assert bool((grad[:, 800] == 0).all())


@pytest.mark.parametrize("divergence", ["kl", "is", "gkl"])
@pytest.mark.parametrize("pattern", ["offset", "rising", "falling"])
def test_dense_distrib_sums_across_blocks(divergence, pattern):
    """Pass 1 gathers the KL and IS sums against a pivot (the running max of u - z) and rebases
    them when the pivot or the teacher's max rises. Rows whose maxima rise in every block
    ("rising") or only in the first ("falling") match the float64 reference. In "offset" the
    teacher is the student shifted by 1000 plus small noise (KL near 0 on top of a large common
    offset); the logits lie on a grid of 1/64 and the noise on one of 1/1024, so u - z is exact
    in float32, and the kernel, unlike the eager float32 reference (whose log q rounds at 1000),
    stays within float32 rounding of its sums of the small KL (about 2e-5)."""
    case = make_case("dense", 12, 2600, None)
    if pattern == "offset":
        gen = torch.Generator().manual_seed(3)
        student = torch.round(case["logits"] * 64) / 64
        noise = torch.randint(-8, 9, student.shape, generator=gen).double() / 1024
        case["logits"], case["teacher"] = student.float(), (student + 1000 + noise).float()
        assert bool((case["teacher"].double() - case["logits"].double() - 1000 == noise).all())
    else:
        ramp = torch.linspace(-30, 30, 2600, dtype=torch.float64)
        sign = 1 if pattern == "rising" else -1
        case["logits"] = (case["logits"] + sign * ramp).float()
        case["teacher"] = (case["teacher"] + sign * 1.5 * ramp).float()
    loss, grad = run_kernel(case, divergence, "distrib", "zero")
    truth = run_reference(case, divergence, "distrib", "zero")
    assert_float32_close(case, loss, grad, truth, divergence=divergence, objective="distrib",
                         tail="zero")
    if pattern == "offset":
        # float32 block sums of the normalisers leave ~1e-6 of the log sums; rounding the gap
        # (about 1000) to float32 would leave its ulp, 6e-5, three times the KL itself.
        loss_err = float((loss.double() - truth[0]).abs().max())
        assert loss_err <= 2e-6, loss_err


@pytest.mark.parametrize("divergence", ["kl", "gkl"])
def test_row_views_at_any_alignment(divergence):
    """Column blocks are cut at the row's 64-byte lines: rows starting 0-15 floats past a line
    (views of a wider buffer, V = 1300) give the reference's values, and two allocations of the
    same rows give the same bits."""
    case = make_case("dense", 16, 1316, None)
    kw = dict(teacher_logits=None, divergence=divergence, objective="distrib", backend="cpp",
              reduction="none")
    for shift in (0, 3, 7, 15):
        logits = case["logits"][:, shift:shift + 1300].detach().requires_grad_()
        teacher = case["teacher"][:, shift:shift + 1300]
        target = case["target"].clamp(0, 1299)
        kw["teacher_logits"] = teacher
        loss = tcsm_kernels.fused_tcsm_loss(logits, target, **kw)
        (grad,) = torch.autograd.grad(loss.sum(), logits)
        ref_logits = logits.detach().double().requires_grad_()
        ref = reference.tcsm_loss(ref_logits, target, teacher_logits=teacher.double(),
                                  divergence=divergence, objective="distrib", reduction="none")
        (ref_grad,) = torch.autograd.grad(ref.sum(), ref_logits)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    # Two allocations of the same rows (torch aligns both to 64 bytes): identical bits.
    kw["teacher_logits"] = case["teacher"][:, :1300].contiguous()
    results = []
    for _ in range(2):
        padding = torch.empty(int(torch.randint(1, 100, ())))  # moves the next allocation
        logits = case["logits"][:, :1300].clone().requires_grad_()
        loss = tcsm_kernels.fused_tcsm_loss(logits, case["target"].clamp(0, 1299), **kw)
        results.append((loss, torch.autograd.grad(loss.sum(), logits)[0]))
        del padding
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("v,mask_id", [(41, None), (1000, 17)])
def test_low_precision_no_worse_than_eager(config, dtype, v, mask_id):
    kind, divergence, objective, tail = config
    case = make_case(kind, 37, v, mask_id, dtype=dtype)
    options = dict(mask_id=mask_id, temperature=0.8 if kind == "dense" else 1.0)
    loss, grad = run_kernel(case, divergence, objective, tail, **options)
    assert grad.dtype == dtype
    truth_loss, truth_grad = run_reference(case, divergence, objective, tail, **options)
    eager_loss, eager_grad = run_reference(case, divergence, objective, tail,
                                           dtype=dtype, **options)
    scale = row_scale(truth_grad)
    kernel_err = ((grad.double() - truth_grad).abs() / scale).max()
    eager_err = ((eager_grad.double() - truth_grad).abs() / scale).max()
    assert kernel_err <= eager_err + torch.finfo(dtype).eps, (kernel_err, eager_err)
    loss_scale = 1 + truth_loss.abs().max()
    kernel_loss_err = (loss.double() - truth_loss).abs().max() / loss_scale
    eager_loss_err = (eager_loss.double() - truth_loss).abs().max() / loss_scale
    assert kernel_loss_err <= eager_loss_err + 1e-5, (kernel_loss_err, eager_loss_err)
    assert_zero_rows(case, loss, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_in_place_gradient_equals_separate_buffer(config, dtype):
    kind, divergence, objective, tail = config
    case = make_case(kind, 37, 300, 5, dtype=dtype)
    options = dict(mask_id=5, temperature=0.9)
    loss, grad = run_kernel(case, divergence, objective, tail, **options)
    buffer = case["logits"].clone()
    loss_inplace, grad_inplace = run_kernel(case, divergence, objective, tail, grad=buffer,
                                            logits=buffer, **options)
    assert grad_inplace.data_ptr() == buffer.data_ptr()
    assert torch.equal(loss_inplace, loss)
    assert torch.equal(grad_inplace, grad)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_extreme_logits_stay_finite(config):
    kind, divergence, objective, tail = config
    case = make_case(kind, 37, 257, 9, scale=1e4)
    loss, grad = run_kernel(case, divergence, objective, tail, mask_id=9)
    assert bool(torch.isfinite(loss).all())
    assert bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_bad_ids_give_nan_row_and_zero_gradient(config):
    kind, divergence, objective, tail = config
    v, mask_id = 50, 7
    case = make_case(kind, 8, v, mask_id)
    case["target"][:] = torch.tensor([v, -5, mask_id, 3, 4, 1 << 40, 6, 8])
    case["weight"] = torch.ones(8)
    bad = [0, 1, 2, 5]
    if kind in ("sparse", "topk"):
        case["topk"][0][3, 1] = v
        case["topk"][0][4, 0] = -1
        bad += [3, 4]
    loss, grad = run_kernel(case, divergence, objective, tail, mask_id=mask_id)
    good = [i for i in range(8) if i not in bad]
    assert bool(loss[bad].isnan().all())
    assert bool((grad[bad] == 0).all())
    good_case = {key: (value[good] if isinstance(value, torch.Tensor) else value)
                 for key, value in case.items()}
    if kind in ("sparse", "topk"):
        good_case["topk"] = tuple(t[good] for t in case["topk"])
    options = dict(divergence=divergence, objective=objective, tail=tail, mask_id=mask_id)
    assert_float32_close(good_case, loss[good], grad[good], run_reference(good_case, **options),
                         **options)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_strided_rows(config):
    """Row strides other than V (views into wider buffers) for logits, teacher and grad."""
    kind, divergence, objective, tail = config
    n, v = 9, 123
    case = make_case(kind, n, v, None)
    wide = torch.randn(n, v + 13)
    wide[:, 5:5 + v] = case["logits"]
    grad_wide = torch.full((n, v + 7), 7.0)
    expected_loss, expected_grad = run_kernel(case, divergence, objective, tail)
    if kind == "dense":
        wide_teacher = torch.randn(n, 2 * v)
        wide_teacher[:, v:] = case["teacher"]
        case["teacher"] = wide_teacher[:, v:]
    loss, grad = run_kernel(case, divergence, objective, tail, logits=wide[:, 5:5 + v],
                            grad=grad_wide[:, 2:2 + v])
    assert torch.equal(loss, expected_loss)
    assert torch.equal(grad, expected_grad)
    assert bool((grad_wide[:, :2] == 7).all()) and bool((grad_wide[:, 2 + v:] == 7).all())


@pytest.mark.parametrize("config", [c for c in CONFIGS if c[3] == "zero"], ids=config_id)
def test_gpt2_vocabulary(config):
    kind, divergence, objective, tail = config
    case = make_case(kind, 3, 50258, 50257, k=64)
    case["target"][:] = torch.tensor([11, 50000, 0])
    loss, grad = run_kernel(case, divergence, objective, tail, mask_id=50257)
    options = dict(divergence=divergence, objective=objective, tail=tail, mask_id=50257)
    assert_float32_close(case, loss, grad, run_reference(case, **options), **options)


def test_rejects_kl_without_a_distribution_target():
    case = make_case("dense", 2, 5, None)
    with pytest.raises(RuntimeError, match="kl"):
        run_kernel(case, "kl", "score", "zero")


def test_row_logsumexp_matches_torch():
    """tcsm_kernels.row_logsumexp (the smallest C++ op) against torch.logsumexp, with rows that
    start with -inf (banned tokens: the online max is -inf for a while) or are all -inf.
    Guards the online max against exp(-inf - -inf) = NaN, which would make such a row NaN."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 300, generator=gen) * 5
    x[1, :200] = float("-inf")
    x[2, 10:20] = float("-inf")
    x[3] = float("-inf")
    got = tcsm_kernels.row_logsumexp(x, backend="cpp")
    torch.testing.assert_close(got, torch.logsumexp(x, dim=1), rtol=1e-6, atol=1e-6)
