"""Training: the loss falls, resume is exact, DDP equals one process, checkpoints are plain Llama models,
and bad input gives one clear line. Everything runs on CPU with a micro model in well under a minute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import tiny
import torch

from sparsinglaw.data import build_corpus, dedup, open_corpus, read_documents, split_documents
from sparsinglaw.errors import UserError
from sparsinglaw.train import ModelConfig, MuPTransformer, TrainConfig, list_checkpoints, parse_tokens, train
from sparsinglaw.train.checkpoint import STATE_FILE
from sparsinglaw.train.export import save_hf


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return tiny.prose_corpus(tmp_path_factory.mktemp("prose"), duplicate=True)


def micro(corpus_dir: Path, out: Path, **kw) -> TrainConfig:
    """A micro model: 2 layers of width 32, 4 × 32 tokens per micro-batch, 2 micro-batches per step."""
    base = TrainConfig(out=str(out), tokens=256 * 12, preset="tiny", act="relu", d_model=32, n_layers=2,
                       head_dim=16, seq_len=32, batch_size=4, grad_accum=2, data=[str(corpus_dir)],
                       ckpt_every=256 * 4, log_every=1, progress=False)
    return replace(base, **kw)


def step_losses(run: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def test_corpus_dedup_and_document_split(corpus_dir: Path) -> None:
    c = open_corpus(corpus_dir)
    assert c.meta["documents_read"] - c.meta["documents"] >= 1  # the duplicate went
    train_docs, val_docs = split_documents(dedup(read_documents(None)), c.meta["val_fraction"])
    assert not set(train_docs) & set(val_docs)
    assert set(c.val_documents()) == set(val_docs)
    assert c.dtype.name == "uint16" and len(c.tokens("train")) == c.meta["train_tokens"]
    batches = c.val_batches(seq_len=32, batch_size=4)
    assert batches[0].shape == (4, 32) and batches[0].dtype == torch.long


def test_loss_falls(corpus_dir: Path, tmp_path: Path) -> None:
    res = train(micro(corpus_dir, tmp_path / "run", tokens=256 * 80, lr=0.02), log=lambda _m: None)
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert res.steps == 80 and last < first - 1.0, (first, last)
    assert res.val_loss is not None and res.val_loss < first


def test_resume_equals_uninterrupted(corpus_dir: Path, tmp_path: Path) -> None:
    full = train(micro(corpus_dir, tmp_path / "full"), log=lambda _m: None)
    cfg = micro(corpus_dir, tmp_path / "cut")
    train(replace(cfg, max_steps=10), log=lambda _m: None)  # "killed" after step 10; last checkpoint: 8
    assert [c.step for c in list_checkpoints(cfg.out)] == [4, 8]
    messages: list[str] = []
    resumed = train(cfg, resume=True, log=messages.append)
    assert any("resuming from step-000008" in m for m in messages)
    a, b = step_losses(tmp_path / "full"), step_losses(tmp_path / "cut")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-6
    assert resumed.steps == full.steps == 12
    sa = torch.load(Path(full.checkpoints[-1]) / STATE_FILE, weights_only=True)["model"]
    sb = torch.load(Path(resumed.checkpoints[-1]) / STATE_FILE, weights_only=True)["model"]
    assert all(torch.allclose(sa[k], sb[k], atol=1e-7, rtol=0) for k in sa)


def test_corrupt_or_partial_checkpoints_are_skipped(corpus_dir: Path, tmp_path: Path) -> None:
    cfg = micro(corpus_dir, tmp_path / "run")
    train(replace(cfg, max_steps=9), log=lambda _m: None)
    ckdir = tmp_path / "run" / "checkpoints"
    (ckdir / "step-000008" / STATE_FILE).write_bytes(b"garbage")  # unreadable state
    (ckdir / "step-000009").mkdir()  # a half-written folder without DONE
    messages: list[str] = []
    train(cfg, resume=True, log=messages.append)
    assert any("step-000009" in m and "incomplete" in m for m in messages)
    assert any("step-000008" in m and "unreadable" in m for m in messages)
    assert any("resuming from step-000004" in m for m in messages)
    assert step_losses(tmp_path / "run").keys() == set(range(1, 13))


def test_checkpoints_load_as_plain_llama_with_same_logits(corpus_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen: list[Path] = []
    res = train(micro(corpus_dir, tmp_path / "run", act="silu"), on_checkpoint=seen.append, log=lambda _m: None)
    assert seen == res.checkpoints and len(seen) == 3
    ck = list_checkpoints(tmp_path / "run")[-1]
    assert ck.tokens == 12 * 256 and ck.meta["act"] == "silu"
    hf = AutoModelForCausalLM.from_pretrained(ck.path).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.hidden_act == "silu"
    tok = AutoTokenizer.from_pretrained(ck.path)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    ours = MuPTransformer(ModelConfig(**cfg)).eval()
    ours.load_state_dict(torch.load(ck.path / STATE_FILE, weights_only=True)["model"])
    x = torch.tensor([tok.encode("def f(x):\n    return x + 1\n")])
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


@pytest.mark.parametrize("act", ["relu", "silu", "gelu", "relu2"])
def test_export_is_exact_in_float64(tmp_path: Path, act: str) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = MuPTransformer(ModelConfig(vocab_size=128, d_model=32, n_layers=3, head_dim=8, act=act,
                                       max_seq_len=64)).double().eval()
    save_hf(model, tmp_path, dtype=torch.float64)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    x = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        assert torch.allclose(model(x), hf(x).logits, atol=1e-10, rtol=0)


def test_two_process_ddp_matches_one_process(corpus_dir: Path, tmp_path: Path) -> None:
    single = micro(corpus_dir, tmp_path / "one", tokens=256 * 6, ckpt_every=256 * 3)
    train(single, log=lambda _m: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sparsinglaw", "train", "--out", str(tmp_path / "two"), "--data", str(corpus_dir),
           "--tokens", str(256 * 6), "--ckpt-every", str(256 * 3), "--d-model", "32", "--n-layers", "2",
           "--head-dim", "16", "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2", "--quiet",
           "--log-every", "1",
           "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5, (a, b)
    assert [c.step for c in list_checkpoints(tmp_path / "two")] == [3, 6]


def test_parse_tokens() -> None:
    assert parse_tokens("20M") == 20_000_000 and parse_tokens("1.5b") == 1_500_000_000
    assert parse_tokens("512K") == 512_000 and parse_tokens("4096") == 4096
    with pytest.raises(UserError):
        parse_tokens("lots")


@pytest.mark.parametrize("override,message", [
    ({"preset": "huge"}, "unknown preset"),
    ({"act": "tanhshrink"}, "unknown activation"),
    ({"d_model": 40}, "not divisible by the head size"),
    ({"tokens": 100}, "fewer than one batch"),
])
def test_bad_input_raises_user_error(corpus_dir: Path, tmp_path: Path, override: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        train(micro(corpus_dir, tmp_path / "run", **override), log=lambda _m: None)


def test_empty_corpus_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="holds no|empty"):
        build_corpus(tmp_path / "c", [tmp_path / "src"], vocab_size=300, log=lambda _m: None)


def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, capsys) -> None:
    from sparsinglaw.cli import main

    for args in (["--preset", "huge"], ["--act", "nope"], ["--d-model", "100"], ["--tokens", "10"]):
        with pytest.raises(SystemExit) as e:
            main(["train", "--out", str(tmp_path / "r"), "--quiet", *args])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error:") and "\n" not in err, err
