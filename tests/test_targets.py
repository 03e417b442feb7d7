"""Full-context teacher targets (tcsm_kernels/train/targets.py): the exact scores against brute
force over every neighbour sequence, the denoiser route, and the resumable, atomic store."""
import json

import numpy as np
import pytest
import torch

from tcsm_kernels.train import targets
from tcsm_kernels.train.ar_teacher import CausalTeacher
from tcsm_kernels.train.model import Denoiser, DenoiserConfig

V, L = 5, 7


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = CausalTeacher(V, L, d_model=16, n_layers=2, n_heads=2).eval()
    with torch.no_grad():  # a sharper model than the init, so the terms are not all tiny
        for p in model.parameters():
            p.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, V, (3, L), generator=torch.Generator().manual_seed(1))


def brute_force_scores(teacher, x):
    """log p(x with x_i = y) - log p(x) by scoring every neighbour sequence."""
    b = x.shape[0]
    neighbours = x[:, None, None, :].repeat(1, L, V, 1)
    for i in range(L):
        neighbours[:, i, :, i] = torch.arange(V)
    with torch.no_grad():
        scores = teacher.sequence_log_prob(neighbours.reshape(-1, L)).view(b, L, V)
        return scores - teacher.sequence_log_prob(x)[:, None, None]


def test_ar_scores_equal_brute_force(teacher, windows):
    scores, candidates, local = targets.ar_full_context_scores(teacher, windows)
    truth = brute_force_scores(teacher, windows)
    torch.testing.assert_close(scores, truth, rtol=1e-5, atol=1e-5)
    assert torch.equal(candidates[0, 0], torch.arange(V))
    torch.testing.assert_close(local, teacher.log_probs(windows))
    assert truth.abs().max() > 1.0  # the test is not trivially passing on near-zero terms


def test_ar_scores_on_candidates_hold_the_clean_token(teacher, windows):
    local = teacher.log_probs(windows)
    candidates = targets.local_candidates(local, windows, 3)
    assert (candidates == windows[..., None]).any(-1).all()
    assert all(len(set(row.tolist())) == 3 for row in candidates.reshape(-1, 3))
    scores, _, _ = targets.ar_full_context_scores(teacher, windows, candidates)
    torch.testing.assert_close(scores, brute_force_scores(teacher, windows).gather(-1, candidates),
                               rtol=1e-5, atol=1e-5)


def test_topk_of_scores_is_the_normalised_conditional(teacher, windows):
    scores, candidates, _ = targets.ar_full_context_scores(teacher, windows)
    indices, log_probs = targets.topk_of_scores(scores, candidates, 3)
    full = torch.log_softmax(brute_force_scores(teacher, windows), -1)
    torch.testing.assert_close(log_probs, full.gather(-1, indices), rtol=1e-5, atol=1e-5)
    assert (log_probs[..., :-1] >= log_probs[..., 1:]).all()


def test_denoiser_log_probs_mask_one_position_at_a_time():
    torch.manual_seed(2)
    mask_id = V
    denoiser = Denoiser(DenoiserConfig(V + 1, L, d_model=16, n_layers=1, n_heads=2)).eval()
    x = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(3))
    got = targets.denoiser_log_probs(denoiser, x, mask_id)
    for i in range(L):
        masked = x.clone()
        masked[:, i] = mask_id
        with torch.no_grad():
            logits = denoiser(masked, torch.ones(2))[:, i, :V]
        torch.testing.assert_close(got[:, i], torch.log_softmax(logits, -1))


def test_taylor_check_reports_agreement(teacher, windows):
    report = targets.taylor_check(teacher, windows)
    assert -1 <= report["correlation"] <= 1 and 0 <= report["sign_agreement"] <= 1
    assert report["pairs"] == windows.numel() * (V - 1)


def make_meta(**overrides):
    meta = dict(kind="ar", teacher="teacher", teacher_sha256="0" * 64, vocab_size=V,
                seq_len=L, k=3, candidates=V, windows=10, split_tokens=200)
    return targets.TargetMeta(**(meta | overrides))


def fake_compute(calls):
    def compute(x):
        calls.append(x.shape[0])
        log_q = torch.log_softmax((x[..., None] == torch.arange(V)).float() * 2, -1)
        top = log_q.topk(3, dim=-1)
        return top.indices, top.values
    return compute


def test_store_builds_atomically_and_resumes_without_redoing_windows(tmp_path):
    split = np.random.default_rng(0).integers(0, V, 200).astype(np.uint8)
    out = tmp_path / "t.targets"
    calls = []
    compute = fake_compute(calls)

    def interrupted(x):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return compute(x)

    with pytest.raises(KeyboardInterrupt):
        targets.build_targets(out, make_meta(), split, interrupted, chunk=4, progress=False)
    assert not out.exists()  # only a complete store appears under its name
    partial = targets.TargetStore(tmp_path / "t.targets.partial")
    assert partial.meta.done == 8
    store = targets.build_targets(out, make_meta(), split, compute, chunk=4, progress=False)
    assert calls == [4, 4, 2]  # the third call finished the two remaining windows
    assert store.meta.done == 10 and not (tmp_path / "t.targets.partial").exists()
    starts = targets.pool_starts(200, L, 10)
    assert np.array_equal(store.starts, starts)
    x = torch.from_numpy(split[starts[:, None] + np.arange(L)].astype(np.int64))
    indices, log_probs = compute(x)
    assert np.array_equal(store.indices, indices.numpy())
    assert np.allclose(store.log_probs, log_probs.numpy())
    store.check_for(vocab_size=V, seq_len=L, k=3, split_tokens=200)
    rows, values = store.batch(np.array([0, 9]), 2, torch.device("cpu"))
    assert rows.shape == (2, L, 2) and rows.dtype == torch.int64


def test_store_refuses_another_build_and_a_mismatched_run(tmp_path):
    split = np.random.default_rng(0).integers(0, V, 200).astype(np.uint8)
    out = tmp_path / "t.targets"
    store = targets.build_targets(out, make_meta(), split, fake_compute([]), progress=False)
    with pytest.raises(targets.TargetError, match="another build"):
        targets.build_targets(out, make_meta(k=2), split, fake_compute([]), progress=False)
    for kwargs, match in [(dict(vocab_size=V + 1), "vocabulary"), (dict(seq_len=L + 1), "tokens"),
                          (dict(k=4), "K=3"), (dict(split_tokens=300), "corpus")]:
        run = dict(vocab_size=V, seq_len=L, k=3, split_tokens=200) | kwargs
        with pytest.raises(targets.TargetError, match=match):
            store.check_for(**run)
    with pytest.raises(targets.TargetError, match="teacher"):
        store.check_for(vocab_size=V, seq_len=L, k=3, split_tokens=200, teacher="other")
    # a damaged store: log-probabilities that sum above 1
    damaged = np.load(out / "log_probs.npy", mmap_mode="r+")
    damaged[0, 0] = 0.0
    damaged.flush()
    with pytest.raises(targets.TargetError, match="sum to"):
        targets.TargetStore(out).check_for(vocab_size=V, seq_len=L, k=3, split_tokens=200)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps(meta | {"done": 3}))
    with pytest.raises(targets.TargetError, match="incomplete"):
        targets.TargetStore(out).check_for(vocab_size=V, seq_len=L, k=3, split_tokens=200)
    with pytest.raises(targets.TargetError, match="not a targets store"):
        targets.TargetStore(tmp_path)
    with pytest.raises(targets.TargetError, match="windows"):
        targets.pool_starts(200, L, 1000)
