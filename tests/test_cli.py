"""The command line a user can trust: usage errors, exit codes, interrupts, fail-fast checks, honest results,
progress and the closing line, `compare`, and plots that can be read.

Usage errors, signals and the offline check run the real console entry point in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny
from test_cli_measure import run

from sparsinglaw import models

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def sl(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`sparsinglaw ARGS` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "sparsinglaw", *args], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)


@pytest.fixture
def model_dir(tiny_dir):
    return tiny_dir("llama", act="relu")


def _common(model_dir, out, tokens: str = "256"):
    return ["--model", str(model_dir), "--tokens", tokens, "--seq-len", "32", "--batch-size", "4", "--quiet",
            "--threads", "1", "--out", str(out)]


# --- usage errors: one line, the closest valid option, exit 2 ---------------------------------------------

@pytest.mark.parametrize("args, says", [
    (["mesure"], "did you mean 'measure'"),
    (["measure", "--tokns", "8K"], "did you mean --tokens?"),
    (["tradeoff", "--seq-len", "abc"], "invalid value for '--seq-len'"),
    (["fit"], "missing argument"),
    (["train", "--out"], "requires an argument"),
    (["track", "run", "--lats", "3"], "did you mean --last?"),
    (["compare"], "missing argument"),
])
def test_usage_error_is_one_line_and_exit_2(args, says):
    r = sl(*args)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(err) == 1 and err[0].startswith("error:") and says in err[0], r.stderr
    assert "Traceback" not in r.stderr and "--help" in err[0]


def test_version_and_no_command():
    r = sl("--version")
    assert r.returncode == 0 and r.stdout.strip().startswith("sparsinglaw ") and not r.stderr
    r = sl()
    assert r.returncode == 2 and "measure" in r.stdout + r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("argv, says", [
    (["measure", "--metric", "zer"], "unknown --metric 'zer' (did you mean zero?)"),
    (["measure", "--search", "refrence"], "did you mean reference?"),
    (["measure", "--topk-mode", "pooledd"], "did you mean pooled?"),
    (["measure", "--positions", "labelled"], "did you mean labeled?"),
    (["measure", "--tokens", "8X"], "cannot read --tokens '8X'"),
    (["measure", "--calib-tokens", "-1K"], "--calib-tokens must be a positive token count"),
    (["tradeoff", "--tokens", "lots"], "cannot read --tokens"),
    (["track", "run", "--tokens", "0"], "--tokens must be a positive"),
    (["train", "--out", "{tmp}/r", "--ckpt-every", "x"], "cannot read --ckpt-every"),
    (["fit", "a.json", "--out", "{tmp}/f", "--form", "rellu"], "did you mean relu?"),
    (["measure", "--threads", "0"], "--threads must be >= 1"),
])
def test_bad_option_values_fail_before_any_model_loads(argv, says, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert run([a.format(tmp=tmp_path) for a in argv] + (["--out", str(tmp_path / "o")]
                                                            if argv[0] in ("measure", "tradeoff") else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and says in err[0], err
    assert not (tmp_path / "o").exists()


def test_token_counts_take_k_and_m_suffixes(model_dir, tmp_path):
    assert run(["measure", *_common(model_dir, tmp_path / "o", tokens="0.256K"), "--metric", "zero"]) == 0
    assert json.loads((tmp_path / "o" / "measurement.json").read_text())["tokens"] == 256


# --- fail fast: --out, --seq-len, offline hub ids ---------------------------------------------------------

def test_out_that_is_a_file_fails_before_the_model_loads(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    f = tmp_path / "results"
    f.write_text("mine")
    for cmd in (["measure"], ["tradeoff"]):
        assert run([*cmd, "--model", str(model_dir), "--out", str(f)]) == 2
        err = capsys.readouterr().err.strip()
        assert "is a file" in err and len(err.splitlines()) == 1
    assert f.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_out_fails_before_the_model_loads(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    assert run(["measure", "--model", str(model_dir), "--out", str(ro / "x")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_seq_len_beyond_the_context_is_refused_unless_allowed(model_dir, tmp_path, capsys, monkeypatch):
    ctx = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    args = ["--model", str(model_dir), "--tokens", str(4 * ctx), "--seq-len", str(2 * ctx), "--batch-size", "1",
            "--quiet", "--metric", "zero"]
    with monkeypatch.context() as mp:
        mp.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
        assert run(["measure", *args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert f"exceeds the {ctx}-token context" in err and "--allow-long" in err
    assert run(["measure", *args, "--allow-long", "--out", str(tmp_path / "b")]) == 0
    assert "warning:" in capsys.readouterr().err and (tmp_path / "b" / "measurement.json").exists()


def test_offline_hub_id_fails_at_once(tmp_path):
    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    t0 = time.perf_counter()
    r = sl("measure", "--model", "someone/not-a-cached-model", "--out", str(tmp_path / "o"), "--quiet", env=env)
    assert r.returncode == 2 and "HF_HUB_OFFLINE" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert time.perf_counter() - t0 < 60  # no minute of retries (the interpreter start is most of it)
    assert not (tmp_path / "o").exists()


# --- honest results ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("search", ["fast", "reference"])
def test_unreachable_target_exits_3_and_marks_the_json(model_dir, tmp_path, capsys, search):
    out = tmp_path / "o"
    assert run(["measure", *_common(model_dir, out), "--p", "1000", "--search", search, "--tol", "1e-3"]) == 3
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "not reached" in err[0] and "best PPL ratio" in err[0]
    meas = json.loads((out / "measurement.json").read_text())
    assert meas["reached"] is False and meas["search"]["message"]
    assert "NOT reached" in captured.out


def test_reached_target_is_marked_reached(model_dir, tmp_path):
    assert run(["measure", *_common(model_dir, tmp_path / "o"), "--metric", "cett", "--tau", "0.2"]) == 0
    assert json.loads((tmp_path / "o" / "measurement.json").read_text())["reached"] is True


def test_pooled_topk_with_a_zero_cut_reports_the_zero_aware_ratio(model_dir, tmp_path, capsys):
    """On a ReLU model over half of s is exactly 0, so keeping 80% pooled puts the cut at 0: the authors'
    count includes zeros; the zero-aware ratio must equal what --metric zero measures (computed apart)."""
    assert run(["measure", *_common(model_dir, tmp_path / "z"), "--metric", "zero"]) == 0
    zero = json.loads((tmp_path / "z" / "measurement.json").read_text())["activation_ratio"]
    assert zero < 0.8
    assert run(["measure", *_common(model_dir, tmp_path / "t"), "--metric", "topk", "--k", "0.8"]) == 0
    meas = json.loads((tmp_path / "t" / "measurement.json").read_text())
    assert meas["activation_ratio"] >= 0.8  # the authors' count: every |s| >= 0 kept, zeros included
    assert meas["zero_aware_activation_ratio"] == pytest.approx(zero, abs=1e-9)
    assert any("cut is 0" in n for n in meas["notes"]) and "cut is 0" in capsys.readouterr().out
    assert run(["measure", *_common(model_dir, tmp_path / "k"), "--metric", "topk", "--k", "0.1"]) == 0
    low = json.loads((tmp_path / "k" / "measurement.json").read_text())
    assert low["zero_aware_activation_ratio"] is None and not low["notes"]


def test_json_is_world_readable_and_a_rerun_leaves_no_old_files(model_dir, tmp_path):
    out = tmp_path / "o"
    assert run(["measure", *_common(model_dir, out), "--metric", "cett", "--tau", "0.2"]) == 0
    (out / "my-notes.txt").write_text("kept")
    assert (out / "thresholds.json").exists()
    for f in ("measurement.json", "thresholds.json"):
        assert stat.S_IMODE((out / f).stat().st_mode) & 0o044 == 0o044
    assert run(["measure", *_common(model_dir, out), "--metric", "topk", "--k", "0.3", "--topk-mode",
                "per-token"]) == 0
    assert not (out / "thresholds.json").exists()  # per-token Top-k has none: the cett run's is gone
    assert (out / "my-notes.txt").read_text() == "kept"
    assert json.loads((out / "measurement.json").read_text())["metric"] == "topk"


# --- progress, phases and the closing line ------------------------------------------------------------------

def test_phases_and_closing_line(model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["measure", *_common(model_dir, out), "--p", "5"]
    argv.remove("--quiet")
    assert run(argv) in (0, 3)
    cap = capsys.readouterr()
    for phase in ("[data]", "[model load]", "[search]", "[static check] re-applying", "[plots]", "[writing]"):
        assert phase in cap.err, phase
    closing = cap.out.strip().splitlines()[-1]
    assert closing.startswith("done in") and "target PPL ratio 1.05" in closing
    for f in ("measurement.json", "thresholds.json", "layer_ratio.png", "heatmap.png", "neuron_frequency.png"):
        assert str(out / f) in closing
    timings = json.loads((out / "measurement.json").read_text())["timings"]
    assert timings["threads"] == 1 and {"imports", "model load", "search", "plots"} <= set(timings["phases"])


def test_tradeoff_bar_counts_points(model_dir, tmp_path, capsys):
    argv = ["tradeoff", *_common(model_dir, tmp_path / "t", tokens="128")]
    argv.remove("--quiet")
    assert run(argv) == 0
    err = capsys.readouterr().err
    assert "tradeoff points" in err and "28/28" in err  # 1 batch x (9 + 9 + 9 + 1) points


def test_default_threads_do_not_oversubscribe(monkeypatch):
    from sparsinglaw import console

    monkeypatch.setattr(console, "available_cpus", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.2, 0, 0))
    assert console.default_threads() == 3
    monkeypatch.setattr(os, "getloadavg", lambda: (12.0, 0, 0))
    assert console.default_threads() == 1


# --- interrupts: exit 130 / 143 and one line saying what was kept -------------------------------------------

def _interrupt(args: list[str], sig: int, when: str, timeout: float = 120) -> tuple[int, str]:
    """Start `sparsinglaw ARGS`, send `sig` once its stderr shows `when`, return (exit status, stderr)."""
    p = subprocess.Popen([sys.executable, "-m", "sparsinglaw", *args], stderr=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, text=True, env=ENV)
    lines = []
    t0 = time.monotonic()
    for line in p.stderr:
        lines.append(line)
        if when in line:
            p.send_signal(sig)
            break
        assert time.monotonic() - t0 < timeout, "".join(lines)
    rest = p.stderr.read()
    return p.wait(timeout=timeout), "".join(lines) + rest


@pytest.mark.parametrize("sig, code, name", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_measure_interrupted_exits_128_plus_signal_and_writes_nothing(model_dir, tmp_path, sig, code, name):
    out = tmp_path / "o"
    args = ["measure", "--model", str(model_dir), "--tokens", "64K", "--seq-len", "32", "--batch-size", "4",
            "--search", "reference", "--tol", "1e-12", "--threads", "1", "--out", str(out)]
    rc, err = _interrupt(args, sig, "[search]")
    last = err.strip().splitlines()[-1]
    assert rc == code, err
    assert last.startswith(f"interrupted ({name}): nothing written") and "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny.prose_corpus(tmp_path_factory.mktemp("prose"))


def test_train_interrupted_keeps_the_last_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--preset", "tiny", "--d-model", "32", "--n-layers", "2", "--head-dim",
            "16", "--seq-len", "32", "--batch-size", "4", "--tokens", "50M", "--ckpt-every", "1K", "--data",
            str(corpus), "--threads", "1", "--device", "cpu"]
    p = subprocess.Popen([sys.executable, "-m", "sparsinglaw", *args], stderr=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, text=True, env=ENV)
    t0 = time.monotonic()
    while not list((out / "checkpoints").glob("step-*/DONE")) if (out / "checkpoints").is_dir() else True:
        assert p.poll() is None and time.monotonic() - t0 < 180, p.stderr.read()
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    err = p.stderr.read()
    assert p.wait(timeout=120) == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted (SIGINT): kept") and "--resume" in last and "Traceback" not in err


def test_track_interrupted_says_what_it_kept(corpus, tmp_path):
    from sparsinglaw.train import TrainConfig, train

    cfg = TrainConfig(out=str(tmp_path / "run"), tokens=256 * 60, preset="tiny", act="relu", d_model=32,
                      n_layers=2, head_dim=16, seq_len=32, batch_size=4, grad_accum=2, lr=0.02, data=[str(corpus)],
                      ckpt_every=256 * 10, log_every=10, progress=False)
    train(cfg, log=lambda _m: None)
    rc, err = _interrupt(["track", cfg.out, "--tokens", "2K", "--seq-len", "64", "--batch-size", "8",
                          "--threads", "1"], signal.SIGTERM, "calibrating one tau")
    last = err.strip().splitlines()[-1]
    assert rc == 143 and last.startswith("interrupted (SIGTERM): "), err
    assert "no series written yet" in last or "checkpoint(s) measured at tau" in last


def test_track_skips_a_truncated_checkpoint_naming_it(corpus, tmp_path, capsys):
    from sparsinglaw.train import TrainConfig, list_checkpoints, train

    cfg = TrainConfig(out=str(tmp_path / "run"), tokens=256 * 60, preset="tiny", act="relu", d_model=32,
                      n_layers=2, head_dim=16, seq_len=32, batch_size=4, grad_accum=2, lr=0.02, data=[str(corpus)],
                      ckpt_every=256 * 10, log_every=10, progress=False)
    train(cfg, log=lambda _m: None)
    first = list_checkpoints(cfg.out)[0].path
    weights = first / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert run(["track", cfg.out, "--tokens", "2K", "--seq-len", "64", "--batch-size", "8", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert f"skipping checkpoint {first.name}: model.safetensors is truncated or corrupt" in err
    series = json.loads((Path(cfg.out) / "series.json").read_text())
    assert first.name not in [c["name"] for c in series["checkpoints"]] and len(series["checkpoints"]) == 5


# --- compare ------------------------------------------------------------------------------------------------

def test_compare_two_measurements(model_dir, tmp_path, capsys):
    assert run(["measure", *_common(model_dir, tmp_path / "cett"), "--metric", "cett", "--tau", "0.2"]) == 0
    assert run(["measure", *_common(model_dir, tmp_path / "zero"), "--metric", "zero"]) == 0
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert run(["compare", str(tmp_path / "cett"), str(tmp_path / "zero" / "measurement.json"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "CETT (tau 0.2)" in text and "zero" in text
    data = json.loads((out / "compare.json").read_text())["measurements"]
    a = json.loads((tmp_path / "cett" / "measurement.json").read_text())
    assert [d["name"] for d in data] == ["cett", "zero"] and data[0]["activation_ratio"] == a["activation_ratio"]
    assert (out / "layer_ratio.png").stat().st_size > 1000 and (out / "neuron_frequency.png").stat().st_size > 1000
    assert run(["compare", str(tmp_path / "cett"), "--out", str(tmp_path / "c2")]) == 2
    assert run(["compare", str(tmp_path / "cett"), str(tmp_path / "nothing"), "--out", str(tmp_path / "c2")]) == 2


# --- the embedded model's name -------------------------------------------------------------------------------

def test_embedded_model_is_named_for_what_it_is():
    new, old = models.BUILTIN["smollm2-135m-instruct-q4_1"], models.BUILTIN["smollm2-135m"]
    assert new is old and "Instruct" in new["label"] and "Q4_1" in new["label"] and "fp32" in new["label"]
    assert models.model_context("smollm2-135m") == 8192


# --- plots: readable log axes, the near-target panel, a better-fitting form drawn -----------------------------

@pytest.fixture
def figures(monkeypatch):
    """Figures the plot functions would save, kept open (drawn) for inspection."""
    from sparsinglaw import plots

    kept = []

    def keep(fig, path):
        fig.canvas.draw()
        kept.append(fig)
        return Path(path)

    monkeypatch.setattr(plots, "_save", keep)
    return kept


def _labels(ax, which: str):
    ticks = (ax.get_xticklabels() if which == "x" else ax.get_yticklabels())
    lo, hi = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
    pos = [t.get_position()[0 if which == "x" else 1] for t in ticks]
    return [t for t, p in zip(ticks, pos, strict=True) if t.get_text() and lo <= p <= hi]


@pytest.mark.parametrize("tokens", [[1e5, 1.5e5, 2e5, 3e5], [2e3, 1e5, 5e7, 1e9], [1e2, 1e6, 1e10, 1e12]])
def test_log_axis_labels_never_overlap(figures, tmp_path, tokens):
    from sparsinglaw import plots

    n = len(tokens)
    series = {"name": "run", "activation": "relu", "tau": 0.1, "metric": "CETT-PPL-1%", "tokens": tokens,
              "dead_neuron_ratio": [0.1] * n, "checkpoints": [{"name": f"c{i}"} for i in range(n)]}
    plots.track_dead_neurons(series, tmp_path / "d.png")
    ax = figures[-1].axes[0]
    labels = _labels(ax, "x")
    assert len(labels) >= 2, [t.get_text() for t in ax.get_xticklabels()]
    boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.x0)
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), [t.get_text() for t in labels]
    assert "CETT-PPL-1%" in ax.get_title() and "run" in ax.get_title()


def test_tradeoff_has_a_readable_panel_near_the_target(figures, tmp_path):
    from types import SimpleNamespace

    from sparsinglaw import plots

    pts = [{"metric": m, "value": v, "activation_ratio": a, "ppl_ratio": r}
           for m, v, a, r in [("cett", 0.1, 0.3, 1.004), ("cett", 0.3, 0.1, 1.05), ("cett", 0.6, 0.05, 3.0),
                              ("topk", 0.3, 0.3, 1.02), ("topk", 0.1, 0.1, 1.5), ("fat", 0.05, 0.3, 1.01),
                              ("zero", 0.0, 0.5, 1.0)]]
    plots.tradeoff(SimpleNamespace(model="m", points=pts), tmp_path / "t.png")
    whole, near = figures[-1].axes
    assert near.get_ylim() == (1.0, 1.1) and len(_labels(whole, "y")) >= 2
    title = figures[-1]._suptitle.get_text()
    assert "m:" in title and "CETT tau 0.1-0.6" in title and "Top-k k 0.1-0.3" in title


def test_fit_plot_draws_the_form_that_fits_better(figures, tmp_path):
    import numpy as np

    from sparsinglaw import plots

    D = np.geomspace(0.1, 10, 12)
    band = {"D": D.tolist(), "curve": (0.1 + 0.2 / D).tolist()}
    plots.plot_law_fit(D, 0.1 + 0.2 / D, np.ones(12, bool), band, tmp_path / "f.png", label="relu",
                       others=[{"label": "sigmoid baseline (lower AIC)", "D": D, "curve": 0.11 + 0.19 / D}])
    labels = figures[-1].axes[0].get_legend_handles_labels()[1]
    assert "relu" in labels and "sigmoid baseline (lower AIC)" in labels
