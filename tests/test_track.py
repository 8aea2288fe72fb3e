"""Tracking: one tau calibrated on the last five checkpoints, every checkpoint measured at it, a series
that `sparsinglaw fit` reads, incremental updates, the online hook and the Hugging Face callback.

A real micro run (2 layers of width 32, 6 checkpoints, 15K tokens) trains on CPU in a few seconds."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import tiny
from tiny import tiny_model, tiny_tokenizer

from sparsinglaw import cli
from sparsinglaw.data import open_corpus, read_documents
from sparsinglaw.laws import load_series
from sparsinglaw.measure import measure
from sparsinglaw.models import load_model
from sparsinglaw.track import OnlineTracker, SparsityCallback, track
from sparsinglaw.train import TrainConfig, list_checkpoints, train

GEOMETRY = dict(tokens=2048, seq_len=64, batch_size=8)  # 4 validation batches per checkpoint


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory) -> TrainConfig:
    """A trained micro run with 6 checkpoints, measured online (its own tau) at each checkpoint."""
    corpus = tiny.prose_corpus(tmp_path_factory.mktemp("prose"))
    cfg = TrainConfig(out=str(tmp_path_factory.mktemp("runs") / "micro-relu"), tokens=256 * 60, preset="tiny",
                      act="relu", d_model=32, n_layers=2, head_dim=16, seq_len=32, batch_size=4, grad_accum=2,
                      lr=0.02, data=[str(corpus)], ckpt_every=256 * 10, log_every=10, progress=False)
    train(cfg, on_checkpoint=OnlineTracker(tokens=512, log=lambda _m: None), log=lambda _m: None)
    return cfg


@pytest.fixture(scope="module")
def tracked(run_cfg: TrainConfig):
    return track(run_cfg.out, p=1.0, progress=False, **GEOMETRY)


def test_series_has_every_field_and_one_tau(tracked, run_cfg: TrainConfig) -> None:
    s = json.loads(Path(run_cfg.out, "series.json").read_text())
    cks = list_checkpoints(run_cfg.out)
    n = len(cks)
    assert n == 6 and tracked.measured == [c.path.name for c in cks] and tracked.calibrated
    assert s["tokens"] == [c.tokens for c in cks] and [c["step"] for c in s["checkpoints"]] == [c.step for c in cks]
    for key in ("activation_ratio", "ppl", "ppl_dense", "ppl_ratio", "layer_ratio", "dead_neuron_ratio",
                "frequency_histogram", "checkpoints"):
        assert len(s[key]) == n, key
    assert s["activation"] == "relu" and s["width"] == 32 and s["depth"] == 2 and s["non_embedding_params"] > 0
    assert s["p"] == 1.0 and 0 < s["tau"] < 1 and s["calibration"]["tau"] == s["tau"]
    assert s["calibration"]["checkpoints"] == [c.path.name for c in cks[-5:]]
    assert all(0 < a < 1 for a in s["activation_ratio"]) and all(len(row) == 2 for row in s["layer_ratio"])
    assert all(0 <= d <= 1 for d in s["dead_neuron_ratio"])
    assert all(sum(h["counts"]) == 2 * 80 and len(h["edges"]) == 51 for h in s["frequency_histogram"])
    for i in range(n):
        assert math.isclose(s["ppl_ratio"][i], s["ppl"][i] / s["ppl_dense"][i], rel_tol=0.05)
        # the layer mean is the activation ratio (equal tokens per layer)
        assert math.isclose(sum(s["layer_ratio"][i]) / 2, s["activation_ratio"][i], rel_tol=1e-9)
    for png in ("activation_ratio.png", "layer_ratio.png", "dead_neurons.png", "neuron_frequency.png"):
        assert Path(run_cfg.out, png).stat().st_size > 0
    # every point's interval: the noise of its PPL ratio through the calibration's slope dA/dF
    cal = s["calibration"]
    assert cal["a_per_f"] < 0 and cal["band"]["tau_interval"][0] <= cal["band"]["tau"] <= cal["band"]["tau_interval"][1]
    for i in range(n):
        sf, sa, (lo, hi) = s["ppl_ratio_sigma"][i], s["activation_ratio_sigma"][i], s["activation_ratio_interval"][i]
        assert sf > 0 and sa == pytest.approx(sf * abs(cal["a_per_f"]), rel=1e-12)
        assert lo < s["activation_ratio"][i] < hi and (hi - lo) / 2 == pytest.approx(1.959964 * sa, rel=1e-5)


def test_calibrated_tau_gives_mean_ppl_ratio_1_01_over_last_five(tracked, run_cfg: TrainConfig) -> None:
    """Recomputed independently: measure(metric='cett', tau) per checkpoint on the same validation batches."""
    tau = tracked.series["tau"]
    batches = open_corpus(json.loads(Path(run_cfg.out, "config.json").read_text())["corpus"]).val_batches(
        GEOMETRY["seq_len"], GEOMETRY["batch_size"], GEOMETRY["tokens"])
    ratios = []
    for ck in list_checkpoints(run_cfg.out)[-5:]:
        m = measure(load_model(str(ck.path), device="cpu", dtype="fp32").model, batches, metric="cett", tau=tau,
                    static_check=False, progress=False)
        ratios.append(m.ppl_ratio)
    assert abs(sum(ratios) / 5 / 1.01 - 1) < 1e-3, ratios
    assert ratios == pytest.approx(tracked.series["ppl_ratio"][-5:], rel=1e-9)


def test_fit_accepts_the_series(tracked, run_cfg: TrainConfig, tmp_path: Path) -> None:
    s = load_series(tracked.path)
    assert s.name == "micro-relu" and s.activation == "relu" and len(s.tokens) == 6
    cli.main(["fit", str(tracked.path), "--out", str(tmp_path / "fit"), "--bootstrap", "0"])
    assert (tmp_path / "fit").is_dir() and any((tmp_path / "fit").iterdir())
    assert s.sigma is not None and s.sigma.shape == (6,)  # the points' noise, for --weighted
    cli.main(["fit", str(tracked.path), "--out", str(tmp_path / "wfit"), "--bootstrap", "0", "--weighted"])
    assert "weighted by 1/sigma" in (tmp_path / "wfit" / "fit.json").read_text()


def test_second_call_without_new_checkpoints_measures_nothing(tracked, run_cfg: TrainConfig) -> None:
    again = track(run_cfg.out, p=1.0, progress=False, **GEOMETRY)
    assert again.measured == [] and not again.calibrated and len(again.reused) == 6
    assert again.series["tau"] == tracked.series["tau"]
    assert again.series["activation_ratio"] == tracked.series["activation_ratio"]


def test_training_further_measures_new_checkpoints_or_all(tracked, run_cfg: TrainConfig, tmp_path: Path,
                                                          capsys) -> None:
    run = tmp_path / "micro-relu"
    shutil.copytree(run_cfg.out, run)
    train(replace(run_cfg, out=str(run), tokens=256 * 80), resume=True, log=lambda _m: None)
    names = [c.path.name for c in list_checkpoints(run)]
    assert names[-2:] == ["step-000070", "step-000080"]
    cli.main(["track", str(run), "--tokens", "2048", "--seq-len", "64", "--batch-size", "8", "--quiet"])
    out = capsys.readouterr().out
    s = json.loads((run / "series.json").read_text())
    old_tau = tracked.series["tau"]
    assert [c["name"] for c in s["checkpoints"]] == names and s["calibration"]["checkpoints"] == names[-5:]
    if abs(s["calibration"]["tau"] / old_tau - 1) <= 0.01:  # tau kept: only the two new checkpoints
        assert s["tau"] == old_tau and "measured 2, kept 6" in out
        assert s["activation_ratio"][:6] == tracked.series["activation_ratio"]
    else:  # tau moved: everything again, and the output says why
        assert s["tau"] == s["calibration"]["tau"] and "measured 8, kept 0" in out and "tau moved" in out
    # --recalibrate forces a full pass
    forced = track(run, p=1.0, recalibrate=True, progress=False, **GEOMETRY)
    assert forced.calibrated and forced.measured == names


def test_online_tracker_writes_one_line_per_checkpoint(run_cfg: TrainConfig) -> None:
    lines = [json.loads(x) for x in Path(run_cfg.out, "online.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [c.step for c in list_checkpoints(run_cfg.out)]
    for r in lines:
        # 512 tokens make PPL a step function of tau (jumps of 1e-2): the capped search (6 evaluations) may
        # stop at the closest step, and then says so
        assert "error" not in r and 0 < r["activation_ratio"] < 1 and 0 < r["tau"] < 1
        err = abs(r["ppl_ratio"] / 1.01 - 1)
        assert err < 5e-3 or (err < 1e-2 and r["message"].startswith("stopped after 6 evaluations"))
        assert r["measured_tokens"] == 512 and r["seconds"] < 30
        assert r["source"] == "memory" and r["evaluations"] >= 1  # the trainer hands over the model
    log = [json.loads(x) for x in Path(run_cfg.out, "log.jsonl").read_text().splitlines()]
    assert sum(1 for r in log if "hook_s" in r) == 6


def _micro_run(out: Path, corpus: Path) -> TrainConfig:
    """3 checkpoints of a 2-layer width-32 ReLU model (a few seconds on CPU)."""
    return TrainConfig(out=str(out), tokens=256 * 30, preset="tiny", act="relu", d_model=32, n_layers=2,
                       head_dim=16, seq_len=32, batch_size=4, grad_accum=2, lr=0.02, data=[str(corpus)],
                       ckpt_every=256 * 10, log_every=10, progress=False)


@pytest.fixture(scope="module")
def prose(tmp_path_factory) -> Path:
    return tiny.prose_corpus(tmp_path_factory.mktemp("prose-online"))


def test_online_in_memory_equals_from_disk(prose: Path, tmp_path: Path, monkeypatch) -> None:
    import sparsinglaw.track as track_mod

    loads = []
    real_load = track_mod._load
    monkeypatch.setattr(track_mod, "_load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    quiet = dict(tokens=512, log=lambda _m: None)
    mem, disk = OnlineTracker(**quiet), OnlineTracker(**quiet)
    pairs, llamas = [], []

    def hook(path: Path, model) -> None:
        n = len(loads)
        a = mem(path, model=model)
        assert len(loads) == n  # nothing re-read from disk
        llamas.append(mem.llama)
        pairs.append((a, disk(path)))

    train(_micro_run(tmp_path / "run", prose), on_checkpoint=hook, log=lambda _m: None)
    assert len(pairs) == 3 and len(loads) == 3 and all(m is llamas[0] for m in llamas)  # one Llama, reused
    for a, b in pairs:
        assert a["source"] == "memory" and b["source"] == "disk" and "error" not in a and "error" not in b
        for key in ("tau", "activation_ratio", "ppl_ratio", "ppl_dense"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=0), (key, a, b)
        assert a["evaluations"] == b["evaluations"]


@pytest.mark.parametrize("saved, measured", [("float32", "bf16"), ("bfloat16", "fp32"), ("bfloat16", "bf16")])
def test_in_memory_llama_is_the_loaded_checkpoint(tmp_path: Path, saved: str, measured: str) -> None:
    """Bit for bit, in any saved / measurement dtype: weights, RoPE buffers (fp32 even in bf16), logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from sparsinglaw.models import resolve_dtype
    from sparsinglaw.train import ModelConfig, MuPTransformer, save_hf

    torch.manual_seed(0)
    raw = MuPTransformer(ModelConfig(vocab_size=128, d_model=32, n_layers=2, head_dim=16, act="relu",
                                     max_seq_len=64)).train()
    save_hf(raw, tmp_path, dtype=getattr(torch, saved))
    disk = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=resolve_dtype(measured, torch.device("cpu")))
    tracker = OnlineTracker(dtype=measured, log=lambda _m: None)
    mem = tracker._in_memory(raw, tmp_path)
    a, b = dict(mem.named_buffers()) | mem.state_dict(), dict(disk.named_buffers()) | disk.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    x = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        assert torch.equal(mem(x).logits, disk.eval()(x).logits)
    assert raw.training and tracker._in_memory(raw, tmp_path) is mem  # the training model untouched; reused


def test_in_memory_tracking_leaves_training_unchanged(prose: Path, tmp_path: Path) -> None:
    import torch

    from sparsinglaw.train.checkpoint import STATE_FILE

    tracker = OnlineTracker(tokens=512, log=lambda _m: None)
    tracked = train(_micro_run(tmp_path / "tracked", prose), on_checkpoint=tracker, log=lambda _m: None)
    plain = train(_micro_run(tmp_path / "plain", prose), log=lambda _m: None)
    assert tracked.losses == plain.losses
    a, b = (torch.load(r.checkpoints[-1] / STATE_FILE, weights_only=True)["model"] for r in (tracked, plain))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_old_style_hooks_get_the_path_only(prose: Path, tmp_path: Path) -> None:
    import functools

    from sparsinglaw.train.trainer import hook_takes_model

    seen: dict[str, list] = {"plain": [], "kwargs": []}

    def plain(path):  # the pre-model protocol: one positional argument
        seen["plain"].append(path)

    def with_kwargs(path, **kw):
        seen["kwargs"].append((path, sorted(kw)))

    res = train(_micro_run(tmp_path / "run", prose), on_checkpoint=plain, log=lambda _m: None)
    assert seen["plain"] == res.checkpoints and len(res.checkpoints) == 3
    res2 = train(_micro_run(tmp_path / "run2", prose), on_checkpoint=with_kwargs, log=lambda _m: None)
    assert seen["kwargs"] == [(ck, ["model"]) for ck in res2.checkpoints]
    # which callables are offered the model
    assert not hook_takes_model(plain) and not hook_takes_model([].append) and not hook_takes_model(print)
    assert not hook_takes_model(lambda p: None) and not hook_takes_model(functools.partial(plain))
    assert hook_takes_model(with_kwargs) and hook_takes_model(OnlineTracker(log=print))
    assert hook_takes_model(lambda p, model=None: None) and hook_takes_model(lambda p, *, model: None)
    # and an OnlineTracker called the old way still measures (from disk)
    rec = OnlineTracker(tokens=512, log=lambda _m: None)(res.checkpoints[-1])
    assert rec["source"] == "disk" and "error" not in rec and 0 < rec["activation_ratio"] < 1


def test_sparsity_callback_logs_at_every_save(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    tok = tiny_tokenizer()
    model = tiny_model("llama", seed=0).train()
    ids = tok("\n".join(read_documents(None))[:20000])["input_ids"]
    data = [{"input_ids": ids[i:i + 32], "labels": ids[i:i + 32]} for i in range(0, 32 * 8, 32)]
    cb = SparsityCallback(text=read_documents(None)[:3], tokenizer=tok, tokens=512, seq_len=64, batch_size=4)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=3, save_steps=1, save_strategy="steps",
                             per_device_train_batch_size=2, learning_rate=1e-3, report_to="none", use_cpu=True,
                             logging_steps=1, disable_tqdm=True, save_only_model=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    assert [r["step"] for r in cb.records] == [1, 2, 3]
    logged = [r for r in trainer.state.log_history if "sparsity/activation_ratio" in r]
    assert len(logged) == 3 and model.training
    for r in logged:
        assert 0 < r["sparsity/activation_ratio"] <= 1 and 0 < r["sparsity/tau"] <= 1
        # a random-weight model may not reach +1% PPL even at tau = 1; the record then says so
        assert abs(r["sparsity/ppl_ratio"] / 1.01 - 1) < 5e-3 or "tau = 1" in r["sparsity/message"], r
    lines = (tmp_path / "hf" / "sparsity.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]


@pytest.mark.parametrize("args, says", [
    (["track", "{tmp}"], "not a training run"),
    (["track", "{tmp}/missing"], "not a folder"),
    (["track", "{run}", "--last", "9"], "fewer than the 9"),
    (["track", "{run}", "--p", "0"], "positive percentage"),
    (["track", "{run}", "--p", "-1"], "positive percentage"),
])
def test_bad_input_is_one_line_and_exit_2(args, says, run_cfg: TrainConfig, tmp_path: Path, capsys) -> None:
    argv = [a.format(tmp=tmp_path, run=run_cfg.out) for a in args]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and says in err and len(err.splitlines()) == 1, err


def test_no_complete_checkpoint_says_what_to_do(run_cfg: TrainConfig, tmp_path: Path, capsys) -> None:
    run = tmp_path / "empty-run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(Path(run_cfg.out, "config.json"), run / "config.json")
    with pytest.raises(SystemExit):
        cli.main(["track", str(run)])
    assert "no complete checkpoint" in capsys.readouterr().err
