"""Post-training: AR teacher, distillation (docs/math.md 6), reward tilt; tiny configurations."""
import argparse
import json

import pytest
import torch

from tcsm_kernels.train.ar_teacher import CausalTeacher, ar_topk_targets, load_teacher
from tcsm_kernels.train.post_cli import add_post_training_commands
from tcsm_kernels.train.finetune import ResidualStudent, tilted_topk_targets
from tcsm_kernels.train.rewards import (VowelReward, exact_reward_deltas, taylor_reward_deltas,
                                        SequenceClassifier)
from tcsm_kernels.train.run import ConfigError, load_trained
from tcsm_kernels.train.data import Vocabulary, TEXT8_SYMBOLS
from tcsm_kernels.train.progress import read_metrics

TINY = ["--seq-len", "12", "--d-model", "16", "--n-layers", "1", "--n-heads", "2",
        "--batch-size", "8", "--warmup", "2", "--eval-sequences", "8", "--eval-times", "2",
        "--threads", "1", "--quiet"]


def run(argv):
    parser = argparse.ArgumentParser()
    add_post_training_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("post") / "teacher"
    assert run(["train-ar", "--out", str(out), "--steps", "30", "--eval-every", "30", "--lr",
                "1e-2"] + TINY) == 0
    return out


def test_train_ar_learns_and_loads(teacher_dir):
    losses = [r["loss"] for r in read_metrics(teacher_dir / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0]
    teacher, config, corpus = load_teacher(str(teacher_dir / "checkpoints" / "last.pt"))
    assert teacher.data_vocab == corpus.vocab.size and config.seq_len == 12


@pytest.fixture(scope="module")
def store_dir(teacher_dir):
    out = teacher_dir.parent / "targets"
    assert run(["distill-targets", "--teacher", str(teacher_dir), "--out", str(out),
                "--windows", "24", "--chunk", "10", "--quiet"]) == 0
    return out


@pytest.mark.parametrize("target", [
    ["--target", "exact", "--k", "4"], ["--target", "exact", "--k", "0"],
    ["--target", "local", "--k", "0"], ["--target", "taylor", "--k", "4", "--tail",
                                        "renormalize"],
    ["--target", "local", "--objective", "score", "--divergence", "gkl", "--tail", "ignore"]],
    ids=["exact-topk", "exact-dense", "local-dense", "taylor-topk", "local-score"])
def test_distill_trains_and_checkpoint_loads(teacher_dir, store_dir, tmp_path, target):
    out = tmp_path / "student"
    argv = ["distill", "--teacher", str(teacher_dir), "--targets", str(store_dir), "--out",
            str(out), "--steps", "12", "--eval-every", "12", "--lr", "1e-2"] + TINY
    assert run(argv + target) == 0
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])
    student = load_trained(out, device="cpu")
    assert student.step == 12
    assert json.loads((out / "distill.json").read_text())["target"] == target[1]


def test_distill_draws_its_batches_from_the_store_windows(teacher_dir, store_dir, tmp_path):
    from tcsm_kernels.train.batches import make_batch
    from tcsm_kernels.train.distributed import World
    from tcsm_kernels.train.run import make_process
    from tcsm_kernels.train.targets import TargetStore

    store = TargetStore(store_dir)
    assert store.meta.done == 24 and store.meta.k == store.meta.vocab_size
    out = tmp_path / "student"
    assert run(["distill", "--teacher", str(teacher_dir), "--targets", str(store_dir), "--out",
                str(out), "--steps", "1", "--eval-every", "0"] + TINY) == 0
    trained = load_trained(out, device="cpu")
    process = make_process(trained.config, trained.corpus)
    batch = make_batch(trained.config, trained.corpus, process, 1,
                       World(0, 1, torch.device("cpu")), store.starts)
    windows = trained.corpus.train[store.starts[batch.pool_rows.numpy()][:, None]
                                   + torch.arange(12).numpy()]
    clean = torch.where(batch.target != -100, batch.target, batch.x_t)
    assert torch.equal(clean, torch.from_numpy(windows.astype("int64")))


def tiny_causal(seed=0, vocab=5, length=6):
    torch.manual_seed(seed)
    model = CausalTeacher(vocab, length, d_model=8, n_layers=2, n_heads=2).double().eval()
    x = torch.randint(0, vocab, (2, length))
    return model, x


def test_future_gradient_one_backward_equals_per_position():
    model, x = tiny_causal()
    _, gradient = model.log_probs_and_future_gradient(x)
    length = x.shape[1]
    for i in range(length):
        embeddings = model.input_embeddings(x).detach().requires_grad_(True)
        terms = torch.log_softmax(model.next_token_logits(embeddings), -1)
        terms = terms.gather(-1, x[..., None])[..., 0]
        future = terms[:, i + 1:].sum()
        (g,) = torch.autograd.grad(future, embeddings)
        torch.testing.assert_close(gradient[:, i].double(), g[:, i + 1], rtol=1e-5, atol=1e-7)


def test_ar_concrete_score_is_local_plus_future():
    model, x = tiny_causal(seed=1)
    vocab, length = model.data_vocab, x.shape[1]
    with torch.no_grad():
        log_probs = model.log_probs(x)
        base = model.sequence_log_prob(x)
        for i in range(length):
            for y in range(vocab):
                neighbour = x.clone()
                neighbour[:, i] = y
                exact = model.sequence_log_prob(neighbour) - base
                local = log_probs[:, i, y] - log_probs[:, i].gather(-1, x[:, i:i + 1])[:, 0]
                n_terms = model.log_probs(neighbour).gather(-1, neighbour[..., None])[..., 0]
                x_terms = log_probs.gather(-1, x[..., None])[..., 0]
                future = (n_terms - x_terms)[:, i + 1:].sum(-1)
                torch.testing.assert_close(exact, local + future)


def test_taylor_targets_match_first_order_term():
    model, x = tiny_causal(seed=2)
    model = model.float()
    plain_idx, plain = ar_topk_targets(model, x, 3, temperature=2.0)
    idx, with_future = ar_topk_targets(model, x, 3, temperature=2.0, taylor=True)
    assert torch.equal(idx, plain_idx)
    _, gradient = model.log_probs_and_future_gradient(x)
    table = model.token_embedding.weight
    expected = ((table[idx] - table[x][..., None, :]) * gradient[..., None, :]).sum(-1) / 2.0
    torch.testing.assert_close(with_future - plain, expected, rtol=1e-4, atol=1e-5)


def test_reward_tilt_log_ratios_equal_brute_force():
    vocab = Vocabulary("text8", tuple(TEXT8_SYMBOLS))
    reward = VowelReward(vocab)
    torch.manual_seed(0)
    x = torch.randint(0, vocab.size, (2, 5))
    logits = torch.randn(2, 5, vocab.size + 1)
    beta = 0.5
    idx, log_ratios = tilted_topk_targets(logits, x, reward, beta, k=4)
    for b in range(2):
        for i in range(5):
            for j in range(4):
                y = idx[b, i, j]
                neighbour = x[b].clone()
                neighbour[i] = y
                expected = (logits[b, i, y] - logits[b, i, x[b, i]]
                            + (reward(neighbour[None]) - reward(x[b:b + 1]))[0] / beta)
                torch.testing.assert_close(log_ratios[b, i, j], expected)


def test_classifier_taylor_deltas_are_first_order():
    torch.manual_seed(0)
    classifier = SequenceClassifier(6)
    x = torch.randint(0, 6, (2, 7))
    candidates = torch.randint(0, 6, (2, 7, 3))
    exact = exact_reward_deltas(classifier, x, candidates)
    linear = taylor_reward_deltas(classifier, x, candidates)
    # small initial weights: the classifier is nearly linear in its one-hot input
    assert (linear - exact).abs().max() < 0.25 * exact.abs().max()
    assert torch.equal(linear[candidates == x[..., None]], torch.zeros_like(linear)[
        candidates == x[..., None]])

def test_finetune_two_betas(tmp_path, teacher_dir):
    reference = tmp_path / "ref"
    assert run(["distill", "--teacher", str(teacher_dir), "--target", "local", "--out",
                str(reference), "--steps", "4", "--eval-every", "0"] + TINY) == 0
    for beta, reward in (("0.3", "vowels"), ("3", "classifier")):
        out = tmp_path / f"ft_{beta}"
        assert run(["finetune", "--ref", str(reference), "--reward", reward, "--beta", beta,
                    "--out", str(out), "--steps", "4", "--k", "4", "--reward-steps", "5",
                    "--threads", "1", "--quiet"]) == 0
        assert load_trained(reference, device="cpu").step == 4
        assert (out / "checkpoints" / "last.pt").is_file()


def test_residual_student_starts_at_reference():
    model, _ = tiny_causal()
    student = ResidualStudent(model.float())
    x = torch.randint(0, 5, (2, 6))
    t = torch.rand(2)
    torch.testing.assert_close(student(x, t), model(x, t))


def test_bad_inputs(tmp_path, teacher_dir, store_dir):
    local = ["--target", "local"]
    with pytest.raises(ConfigError, match="--teacher"):
        run(["distill", "--teacher", str(tmp_path / "missing"), "--out", str(tmp_path / "a")]
            + local + TINY)
    with pytest.raises(ConfigError, match="--vocab"):
        run(["distill", "--teacher", str(teacher_dir), "--out", str(tmp_path / "b"),
             "--vocab", "byte"] + local + TINY)
    with pytest.raises(ConfigError, match="--k"):
        run(["distill", "--teacher", str(teacher_dir), "--out", str(tmp_path / "c"), "--k",
             "99", "--steps", "1"] + local + TINY)
    with pytest.raises(ConfigError, match="needs --targets"):
        run(["distill", "--teacher", str(teacher_dir), "--out", str(tmp_path / "g")] + TINY)
    with pytest.raises(ConfigError, match="--targets .*tokens"):
        run(["distill", "--teacher", str(teacher_dir), "--targets", str(store_dir), "--out",
             str(tmp_path / "h"), "--seq-len", "10", "--steps", "1"] + TINY[2:])
    small = tmp_path / "small-targets"
    assert run(["distill-targets", "--teacher", str(teacher_dir), "--out", str(small),
                "--windows", "4", "--k", "3", "--quiet"]) == 0
    with pytest.raises(ConfigError, match="--targets .*K=3"):
        run(["distill", "--teacher", str(teacher_dir), "--targets", str(small), "--out",
             str(tmp_path / "i"), "--k", "6", "--steps", "1"] + TINY)
    with pytest.raises(ConfigError, match="allowed"):
        run(["distill", "--teacher", str(teacher_dir), "--out", str(tmp_path / "j"),
             "--objective", "score", "--k", "4"] + local + TINY)
    with pytest.raises(ConfigError, match="--k"):
        run(["distill-targets", "--teacher", str(teacher_dir), "--out", str(tmp_path / "k"),
             "--k", "5", "--candidates", "3"])
    with pytest.raises(ConfigError, match="--beta"):
        run(["finetune", "--ref", str(teacher_dir), "--beta", "0", "--out",
             str(tmp_path / "d")])
    with pytest.raises(ConfigError, match="--ref"):
        run(["finetune", "--ref", str(tmp_path / "missing"), "--beta", "1", "--out",
             str(tmp_path / "e")])
    with pytest.raises(ConfigError, match="--teacher"):
        run(["distill", "--teacher", str(tmp_path), "--out", str(tmp_path / "f")] + local + TINY)


def test_tilted_distribution_is_the_normalised_tilt_of_the_reference():
    """q(y) ∝ p_ref(y) exp(delta_y / beta) on the candidates, the reference's mass off them
    untilted: compared with the explicit tilt over the whole vocabulary where only the
    candidates' rewards change."""
    from tcsm_kernels.train.finetune import tilted_topk_distribution

    vocab = Vocabulary("text8", list(TEXT8_SYMBOLS))
    reward = VowelReward(vocab)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, vocab.size + 1, generator=g)
    x = torch.randint(0, vocab.size, (2, 5), generator=g)
    indices, log_q = tilted_topk_distribution(logits, x, reward, 0.5, k=4)
    p = torch.softmax(logits[..., :vocab.size], -1)
    deltas = torch.zeros_like(p).scatter(-1, indices, exact_reward_deltas(reward, x, indices))
    tilted = p * torch.exp(deltas / 0.5)
    expected = (tilted / tilted.sum(-1, keepdim=True)).gather(-1, indices)
    torch.testing.assert_close(log_q.exp(), expected)
    assert (log_q.exp().sum(-1) <= 1 + 1e-6).all()


def test_compare_distill_writes_matched_arms(teacher_dir, tmp_path):
    from tcsm_kernels.train.distill_report import ARMS

    out = tmp_path / "cmp"
    argv = ["compare-distill", "--out", str(out), "--teacher", str(teacher_dir), "--windows",
            "16", "--seeds", "0", "1", "--steps", "4", "--eval-every", "2", "--k", "3"] + TINY
    assert run(argv) == 0
    result = json.loads((out / "distill_comparison.json").read_text())
    assert list(result["arms"]) == list(ARMS)
    for arm in ARMS:
        seeds = result["arms"][arm]["seeds"]
        assert len(seeds) == 2 and all(s["steps"] == [2, 4] for s in seeds)
        assert all(len(s["bpc"]) == len(s["seconds"]) == 2 for s in seeds)
    assert all(key in result for key in ("teacher_bpc", "unigram", "bigram"))
    exact = result["arms"]["exact_dense"]["seeds"][0]
    assert exact["seconds"][0] >= exact["train_seconds"][0] + result["build_seconds"] - 0.01
    assert (out / "comparison.png").is_file() and (out / "comparison.md").is_file()
    before = (out / "data-seed0" / "metrics.jsonl").stat().st_mtime
    assert run(argv) == 0  # finished runs are reused
    assert (out / "data-seed0" / "metrics.jsonl").stat().st_mtime == before
