"""The reference training loop and the `tcsm` command: train/eval/sample/plot end to end on tiny
configurations, resume and DDP equivalence, bad options, damaged checkpoints, data handling."""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tcsm_kernels.train import checkpoint
from tcsm_kernels.train.cli import main
from tcsm_kernels.train.data import TokenCorpus, Vocabulary, entropies, prepare_corpus
from tcsm_kernels.train.distributed import vocab_shard
from tcsm_kernels.train.evaluate import position_nelbo
from tcsm_kernels.train.loss_speed import format_table, loss_table
from tcsm_kernels.train.progress import read_metrics
from tcsm_kernels.train.run import TrainConfig

TINY = ["--seq-len", "16", "--d-model", "32", "--n-layers", "1", "--n-heads", "2",
        "--batch-size", "8", "--warmup", "2", "--eval-every", "0", "--quiet", "--threads", "1"]
REPO = Path(__file__).resolve().parents[1]


def train(out, *extra):
    return main(["train", "--out", str(out), *TINY, *extra])


def losses(run_dir):
    return [r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]


def test_train_eval_sample_plot_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--steps", "6", "--eval-every", "3", "--eval-sequences", "8",
                 "--eval-times", "2") == 0
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    assert [r["step"] for r in records if "val_bits" in r] == [3, 6]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert (run / "checkpoints" / "last.pt").is_file()
    capsys.readouterr()

    assert main(["eval", "--run", str(run), "--time-samples", "2", "--max-sequences", "16",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 6 and result["sequences"] == 16
    assert 0 < result["bigram_bits"] < result["unigram_bits"] < math.log2(27) + 1e-9
    assert math.isfinite(result["nelbo_bits"]) and result["nelbo_bits"] > 0

    alphabet = set(" abcdefghijklmnopqrstuvwxyz")
    for method in ("exact", "euler", "confidence"):
        assert main(["sample", "--run", str(run), "--method", method, "--steps", "8",
                     "--num", "2"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 2 and all(len(x) == 16 and set(x) <= alphabet for x in lines)
    assert main(["sample", "--run", str(run), "--prompt", "the ", "--num", "2"]) == 0
    assert all(x.startswith("the ") for x in capsys.readouterr().out.splitlines())

    assert main(["plot", "--run", str(run)]) == 0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_uniform_process_trains_and_samples(tmp_path, capsys):
    run = tmp_path / "uniform"
    assert train(run, "--process", "uniform", "--steps", "3", "--divergence", "gkl") == 0
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "--num", "2", "--steps", "4"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["sample", "--run", str(run), "--method", "exact"]) == 2
    assert main(["eval", "--run", str(run), "--time-samples", "2", "--max-sequences", "8",
                 "--json"]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["nelbo_bits"])


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(straight, "--steps", "8") == 0
    assert train(resumed, "--steps", "8", "--stop-after", "4") == 0
    assert len(losses(resumed)) == 4
    assert main(["train", "--out", str(resumed), "--resume", "--quiet"]) == 0
    assert losses(resumed) == losses(straight)
    a = checkpoint.load(straight / "checkpoints" / "last.pt")
    b = checkpoint.load(resumed / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 8
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    assert train(tmp_path / "full", "--steps", "3") == 0
    assert train(tmp_path / "accum", "--steps", "3", "--grad-accum", "4") == 0
    assert np.allclose(losses(tmp_path / "full"), losses(tmp_path / "accum"), rtol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_two_processes(out, *extra):
    """`tcsm train` on 2 gloo CPU processes (torchrun) with the TINY options."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "tcsm_kernels", "train", "--out", str(out), *TINY, *extra, "--device", "cpu"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_process_ddp_matches_one_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert train(single, "--steps", "3") == 0
    train_two_processes(ddp, "--steps", "3")
    assert np.allclose(losses(single), losses(ddp), rtol=1e-5)
    a = checkpoint.load(single / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(ddp / "checkpoints" / "last.pt")["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_vocab_parallel_head_matches_the_unsplit_run(tmp_path):
    """The head split over 2 ranks (256 bytes + the mask token: uneven shards of 129 and 128
    rows, the mask column on rank 1), every rank on the whole batch, with accumulation and
    per-row weights: the losses and final weights of the one-process run."""
    options = ["--vocab", "byte", "--time-weight", "elbo", "--steps", "3", "--grad-accum", "2"]
    single, split = tmp_path / "single", tmp_path / "split"
    assert train(single, *options) == 0
    train_two_processes(split, *options, "--vocab-parallel")
    assert json.loads((split / "config.json").read_text())["vocab_parallel"] is True
    assert np.allclose(losses(single), losses(split), rtol=1e-4)
    a = checkpoint.load(single / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(split / "checkpoints" / "last.pt")["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)
    assert train(tmp_path / "one", *options, "--vocab-parallel") == 0  # one process: full head
    assert losses(tmp_path / "one") == losses(single)


def test_vocab_shards_tile_the_vocabulary():
    assert [vocab_shard(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [vocab_shard(257, r, 2) for r in range(2)] == [(0, 129), (129, 257)]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be > 0"),
    (["--data", "/nonexistent/text.txt"], "no such file"),
    (["--batch-size", "6", "--grad-accum", "4"], "divisible"),
    (["--d-model", "30", "--n-heads", "4"], "divisible"),
    (["--vocab-parallel", "--no-fused-head"], "--vocab-parallel needs --fused-head"),
])
def test_bad_options_fail_cleanly(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--quiet", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unknown_process_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(tmp_path / "run"), "--process", "gaussian"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'gaussian'" in capsys.readouterr().err


def test_empty_corpus_and_existing_run_are_refused(tmp_path, capsys):
    text = tmp_path / "empty.txt"
    text.write_text("1234 !!! ...")
    assert main(["train", "--out", str(tmp_path / "run"), "--data", str(text), "--quiet"]) == 2
    assert "too few" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

    run = tmp_path / "kept"
    assert train(run, "--steps", "2") == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert train(run, "--steps", "4") == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--lr", "1.0"]) == 2
    assert f"--lr 1.0 (run: {TrainConfig().lr})" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_corrupt_checkpoint_is_reported_and_the_previous_one_kept(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--steps", "6", "--stop-after", "4", "--ckpt-every", "2") == 0
    last, previous = run / "checkpoints" / "last.pt", run / "checkpoints" / "previous.pt"
    assert checkpoint.load(previous)["step"] == 2
    good_previous = previous.read_bytes()
    last.write_bytes(last.read_bytes()[:1000])  # truncated, as by a crash or a full disk
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and "previous.pt is intact" in err
    assert main(["eval", "--run", str(run)]) == 2
    assert previous.read_bytes() == good_previous
    assert main(["train", "--out", str(run), "--resume", str(previous), "--quiet"]) == 0
    assert checkpoint.load(last)["step"] == 6
    assert checkpoint.load(previous)["step"] == 4  # the damaged file was never rotated in
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 7))


def test_checkpoint_detects_flipped_bytes(tmp_path):
    path = checkpoint.save(tmp_path, {"step": 1, "w": torch.arange(10.0)})
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="checksum"):
        checkpoint.load(path)


@pytest.mark.parametrize("vocab", ["text8", "char", "byte"])
def test_corpus_vocabularies_round_trip(tmp_path, vocab):
    text = "Héllo, World! 12 ab  ab\n" * 50
    source = tmp_path / "text.txt"
    source.write_text(text, encoding="utf-8")
    run = tmp_path / vocab
    run.mkdir()
    corpus = prepare_corpus(run, str(source), vocab, 0.2, 8)
    decoded = corpus.vocab.decode(np.asarray(corpus.tokens))
    expected = {"text8": " ".join("h llo world ab ab".split() * 50) + " ",
                "char": text, "byte": text}[vocab]
    assert decoded == expected
    assert isinstance(corpus.tokens, np.memmap) and corpus.tokens.dtype == np.uint8
    again = TokenCorpus(run, 0.2)
    assert again.vocab == corpus.vocab and len(again.val) == math.ceil(0.2 * len(corpus.tokens))
    assert corpus.vocab.decode(corpus.vocab.encode("ab ab")) == "ab ab"


def test_entropies_of_known_sources():
    rng = np.random.default_rng(0)
    iid = rng.integers(0, 8, 200_000).astype(np.uint8)
    h1, h2 = entropies(iid, 8)
    assert abs(h1 - 3) < 0.01 and abs(h2 - 3) < 0.01
    cycle = np.tile(np.arange(4, dtype=np.uint8), 1000)
    assert entropies(cycle, 4) == pytest.approx((2.0, 0.0), abs=1e-6)


def test_position_nelbo_masked_matches_spec_and_uniform_is_bounded_by_weighted_ce():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, generator=g)
    x1 = torch.randint(0, 5, (2, 5), generator=g)
    x_t = torch.where(torch.rand(2, 5, generator=g) < 0.5, torch.full_like(x1, 5), x1)
    weight = torch.tensor([[2.0], [3.0]])
    terms = position_nelbo(logits, x1, x_t, weight, mask_id=5)
    logp = torch.log_softmax(logits[..., :5], -1).gather(-1, x1[..., None])[..., 0]
    assert torch.allclose(terms, torch.where(x_t == 5, -weight * logp, 0))
    # uniform: every position; the weighted cross-entropy bounds the ELBO term from above
    x_u = torch.randint(0, 6, (2, 5), generator=g)
    uniform = position_nelbo(logits, x1, x_u, weight, mask_id=None)
    ce = -weight * torch.log_softmax(logits, -1).gather(-1, x1[..., None])[..., 0]
    assert (uniform >= -1e-6).all() and (uniform <= ce + 1e-6).all()


def test_loss_table_small():
    table = loss_table(rows=64, vocab=100, repeats=1)
    assert [row["divergence"] for row in table] == ["kl", "gkl"]
    assert all(row["fused"]["seconds"] > 0 and row["reference"]["seconds"] > 0 for row in table)
    assert "speed-up" in format_table(table)


def test_vocabulary_rejects_unknown_prompt_characters():
    vocab = Vocabulary("char", tuple("ab "))
    with pytest.raises(ValueError, match="outside the corpus vocabulary"):
        vocab.encode("abc")


def test_fused_head_trains_as_the_logits_path(tmp_path):
    """--fused-head (the default: loss from the hidden states and the tied head) and
    --no-fused-head (logits, then fused_tcsm_loss) are the same math: same losses and weights
    up to float32 rounding of the matmul order."""
    assert train(tmp_path / "fused", "--steps", "4", "--fused-head") == 0
    assert train(tmp_path / "logits", "--steps", "4", "--no-fused-head") == 0
    assert np.allclose(losses(tmp_path / "fused"), losses(tmp_path / "logits"), rtol=1e-4)
    a = checkpoint.load(tmp_path / "fused" / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(tmp_path / "logits" / "checkpoints" / "last.pt")["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5)
