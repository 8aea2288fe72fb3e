"""`sparsinglaw study` / `report`: plan validation, log-spaced checkpoints, pause and resume, a whole tiny study
on CPU (train -> track -> fit -> report.html) that survives a kill, and the paper comparison's verdicts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sparsinglaw.cli import main
from sparsinglaw.errors import UserError
from sparsinglaw.studies.plan import expand, load_plan
from sparsinglaw.train import TrainConfig, train
from sparsinglaw.train.trainer import checkpoint_steps

ROOT = Path(__file__).resolve().parents[1]

TINY_PLAN = """
name = "tiny"
[data]
sources = ["prose"]
vocab_size = 384
val_fraction = 0.1
[tracking]
tokens = "1K"
seq_len = 32
batch_size = 8
online = false
[defaults]
d_model = 32
n_layers = 2
head_dim = 16
checkpoints = 6
first_checkpoint = 0.1
seq_len = 32
batch_size = 4
grad_accum = 1
lr = 0.02
[[runs]]
name = "first"
activation = "relu"
tokens = "6K"
[[runs]]
name = "second"
activation = "silu"
tokens = "40K"
"""


def _write(tmp_path: Path, text: str, name: str = "plan.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# --- plans -------------------------------------------------------------------------------------------------

BAD = {
    "unknown key": (TINY_PLAN.replace("checkpoints = 6", "checkpionts = 6"), "did you mean 'checkpoints'"),
    "unknown top key": ("tracing = 1\n" + TINY_PLAN, "did you mean 'tracking'"),
    "unknown preset": (TINY_PLAN.replace('name = "first"', 'name = "first"\npreset = "7b"'), "unknown preset"),
    "unknown activation": (TINY_PLAN.replace('"silu"', '"swiglu"'), "unknown activation 'swiglu'"),
    "tokens below one step": (TINY_PLAN.replace('"6K"', "100"), "fewer than one step"),
    "duplicate names": (TINY_PLAN.replace('"second"', '"first"'), "duplicate run name(s) first"),
    "missing source": (TINY_PLAN.replace('["prose"]', '["nowhere/*.txt"]'), "matches no file"),
    "not toml": ("name = ", "not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_plan_exits_2_with_one_line_and_writes_nothing(case: str, tmp_path: Path, capsys) -> None:
    text, message = BAD[case]
    out = tmp_path / "study"
    with pytest.raises(SystemExit) as e:
        main(["study", str(_write(tmp_path, text)), "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not out.exists()


def test_grid_expands_and_sizes_runs_by_tokens_per_param(tmp_path: Path) -> None:
    raw = {"data": {"sources": ["prose"]},
           "defaults": {"tokens_per_param": 200, "seq_len": 32, "batch_size": 4, "grad_accum": 1, "head_dim": 16},
           "grid": [{"shape": [[64, 4], [96, 2, 32]], "activation": ["relu", "silu"], "family": "width-depth"}]}
    _, tracking, runs = expand(raw, tmp_path)
    assert [r.name for r in runs] == ["relu-d64-l4", "silu-d64-l4", "relu-d96-l2", "silu-d96-l2"]
    r = runs[2]
    d_ff = 8 * round(2.5 * 96 / 8)
    assert r.non_embedding_params == 2 * (4 * 96**2 + 3 * 96 * d_ff)
    assert r.tokens == 200 * r.non_embedding_params and r.head_dim == 32 and r.family == "width-depth"
    assert tracking["last"] == 5 and runs[0].checkpoints == 24


def test_smoke_plan_is_valid() -> None:
    plan = load_plan(ROOT / "studies" / "smoke.toml")
    assert len(plan.runs) == 3 and plan.source_args == ["prose"]


# --- log-spaced checkpoints and pause / resume -----------------------------------------------------------------

def test_log_checkpoints_are_geometric_and_end_at_the_last_step() -> None:
    steps = checkpoint_steps(10_000, "log", count=24, first=0.01)
    assert len(steps) == 24 and steps[0] == 100 and steps[-1] == 10_000
    ratios = np.diff(np.log(steps))
    assert np.allclose(ratios, ratios.mean(), atol=0.01)  # equal spacing in log D
    assert checkpoint_steps(100, "linear", every_steps=30) == [30, 60, 90, 100]
    assert len(checkpoint_steps(20, "log", count=24, first=0.01)) < 24  # rounding merges early steps
    with pytest.raises(UserError, match="unknown checkpoint schedule"):
        checkpoint_steps(10, "cosine")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    import tiny

    return tiny.prose_corpus(tmp_path_factory.mktemp("prose"))


def _micro(corpus: Path, out: Path) -> TrainConfig:
    return TrainConfig(out=str(out), tokens=256 * 30, preset="tiny", d_model=32, n_layers=2, head_dim=16,
                       seq_len=32, batch_size=4, grad_accum=2, lr=0.02, data=[str(corpus)], ckpt_schedule="log",
                       ckpt_count=6, ckpt_first=0.1, progress=False, log_every=5)


def test_stop_at_deadline_then_resume_equals_uninterrupted(corpus_dir: Path, tmp_path: Path) -> None:
    full = train(_micro(corpus_dir, tmp_path / "full"), log=lambda _m: None)
    cut = _micro(corpus_dir, tmp_path / "cut")
    first = train(cut, deadline=time.time() - 1, log=lambda _m: None)  # already past: stop after one step
    assert first.stopped and first.steps == 1 and (tmp_path / "cut" / "paused_state.pt").is_file()
    rest = train(cut, resume=True, log=lambda _m: None)
    assert not rest.stopped and rest.steps == full.steps == 30
    assert not (tmp_path / "cut" / "paused_state.pt").exists()
    assert rest.val_loss == pytest.approx(full.val_loss, rel=1e-6)
    steps = json.loads((tmp_path / "full" / "config.json").read_text())["checkpoint_steps"]
    assert steps == checkpoint_steps(30, "log", count=6, first=0.1)
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == [f"step-{s:06d}" for s in steps]


def test_report_to_tensorboard_writes_events(corpus_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    cfg = _micro(corpus_dir, tmp_path / "tb")
    cfg.tokens, cfg.report_to = 256 * 10, "tensorboard"
    train(cfg, log=lambda _m: None)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "val/loss", "perf/tokens_per_s"} <= set(tags)
    log = [json.loads(x) for x in (tmp_path / "tb" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)


# --- a whole study on CPU ---------------------------------------------------------------------------------

def _cli(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sparsinglaw", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """The tiny plan run as a user would: killed while its second run trains, then the same command again."""
    tmp = tmp_path_factory.mktemp("study")
    plan, out = _write(tmp, TINY_PLAN), tmp / "out"
    env = {**os.environ, "SPARSINGLAW_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = _cli("study", str(plan), "--out", str(out), "--quiet", "--device", "cpu", env=env)
    second = out / "runs" / "second" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not any(second.glob("step-*")):
        time.sleep(0.05)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_done = json.loads((out / "runs" / "first" / "run.json").read_text())
    t0 = time.time()
    res = _cli("study", str(plan), "--out", str(out), "--quiet", "--device", "cpu", env=env)
    stdout, _ = res.communicate(timeout=600)
    return {"out": out, "killed": killed, "first_done": first_done, "rc": res.returncode, "stdout": stdout,
            "seconds": time.time() - t0, "plan": plan, "env": env}


def test_study_resumes_after_a_kill_without_redoing_finished_runs(study: dict) -> None:
    assert study["rc"] == 0, study["stdout"]
    assert study["killed"], "the second run finished before the kill; the test did not interrupt it"
    out = study["out"]
    assert "before: first" in study["stdout"] and "study complete" in study["stdout"]
    assert json.loads((out / "runs" / "first" / "run.json").read_text()) == study["first_done"]
    log = (out / "runs" / "second" / "log.jsonl").read_text()
    assert "resum" not in log  # the log reads as one run; the resume is visible in the trainer's message
    steps = [json.loads(x)["step"] for x in log.splitlines() if "loss" in json.loads(x)]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_study_writes_series_fits_summary_and_report(study: dict) -> None:
    out = study["out"]
    s = json.loads((out / "summary.json").read_text())
    assert s["finished"] == ["first", "second"] and s["pending"] == []
    second = json.loads((out / "runs" / "second" / "series.json").read_text())
    cfg = json.loads((out / "runs" / "second" / "config.json").read_text())
    assert [c["step"] for c in second["checkpoints"]] == cfg["checkpoint_steps"]  # every checkpoint measured
    assert len(second["calibration"]["checkpoints"]) == 5  # one tau for the last five
    fits = {f["name"]: f for f in s["fits"]}
    assert fits["second"]["A0"] is None or 0 < fits["second"]["A0"] < 1
    assert set(fits["first"]["delta_aic"]) == {"log", "sigmoid"}
    run = {r["name"]: r for r in s["runs"]}["second"]
    assert run["tokens_per_s"] > 0 and run["tokens_trained"] == cfg["total_steps"] * cfg["tokens_per_step"]
    assert run["epochs"] == pytest.approx(run["tokens_trained"] / s["data"]["train_tokens"])
    assert sum(m["train_tokens"] for m in s["data"]["mix"]) == s["data"]["train_tokens"]
    dom = s["domains"]["second"]["domains"]
    assert set(dom) == {"validation split", "English prose"}
    assert all(0 < d["activation_ratio"] <= 1 for d in dom.values())
    assert s["comparison"] and all(r["verdict"] in ("agree", "disagree", "inconclusive") for r in s["comparison"])
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained
    assert page.count("data:image/png;base64,") >= 5


def test_report_command_rebuilds_the_page(study: dict) -> None:
    out = study["out"]
    (out / "report.html").unlink()
    res = _cli("report", str(out), env=study["env"])
    text, _ = res.communicate(timeout=120)
    assert res.returncode == 0, text
    assert (out / "report.html").is_file()


def test_report_of_a_folder_without_summary_is_a_user_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path)])
    assert e.value.code == 2 and "no summary.json" in capsys.readouterr().err


def test_every_figure_renders_in_a_headless_browser(study: dict) -> None:
    """Open report.html in Chromium and check every <img> decoded (naturalWidth > 0)."""
    browser_path = "/usr/bin/chromium"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not Path(browser_path).exists():
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and playwright (see .ci/run)")
        pytest.skip("needs Debian's chromium and `pip install playwright` (installed in CI)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path,
                                     args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto((study["out"] / "report.html").resolve().as_uri())
        page.wait_for_load_state("load")
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.alt, i.complete, i.naturalWidth])")
        browser.close()
    assert len(widths) >= 5
    broken = [alt for alt, complete, w in widths if not complete or w <= 0]
    assert not broken, f"figures that did not render: {broken}"


# --- the paper comparison ------------------------------------------------------------------------------------

def _fit(name: str, act: str, n: float, a0: float, ci: list[float], trend: str, d_aic: float = -10.0,
         conv: float | None = None, conv_ci: list | None = None) -> dict:
    return {"converged_tokens": conv, "converged_ci": conv_ci,
            "name": name, "activation": act, "family": None, "non_embedding_params": n, "A0": a0, "A0_ci": ci,
            "trend": trend, "selection": "auto: the ratio falls with data", "success": True,
            "delta_aic": {"log": d_aic, "sigmoid": d_aic}, "first_ratio": 0.2, "last_ratio": 0.1,
            "final_val_loss": 3.0, "params": {"A0": a0}, "ci": {"A0": ci}, "form": "relu"}


def test_comparison_verdicts_follow_their_rules() -> None:
    from sparsinglaw.studies.paper import compare

    fits = [_fit("r1", "relu", 1e6, 0.07, [0.06, 0.08], "falls", conv=5e7, conv_ci=[4e7, 6e7]),
            _fit("r2", "relu", 4e6, 0.075, [0.07, 0.08], "falls", conv=8e8, conv_ci=[6e8, 1e9]),
            _fit("s1", "silu", 1e6, 0.40, [0.38, 0.42], "rises"), _fit("s2", "silu", 4e6, 0.30, [0.28, 0.31], "rises")]
    scale = [{k: f[k] for k in ("name", "activation", "non_embedding_params", "A0", "A0_ci")} for f in fits]
    verdict = {r["key"]: r["verdict"] for r in compare({"fits": fits, "scale": scale})}
    assert verdict["relu-trend"] == "agree" and verdict["silu-trend"] == "agree"
    assert verdict["relu-scale"] == "agree"  # intervals span 6-8%: within 3 points
    assert verdict["silu-scale"] == "disagree"  # 0.31 vs 0.38: the intervals alone are 7 points apart
    assert verdict["relu-vs-silu"] == "agree"  # ReLU's interval lies below SiLU's at both sizes
    assert verdict["relu-convergence"] == "agree"  # 40-60 vs 150-250 tokens per parameter
    assert "silu-convergence" not in verdict  # no forecasts: no claim
    rows = compare({"fits": [_fit("r1", "relu", 1e6, 0.07, [0.06, 0.08], "rises")]})
    assert rows[0]["verdict"] == "disagree"
    rows = compare({"fits": [_fit("r1", "relu", 1e6, 0.07, [0.06, 0.08], "falls", d_aic=3.0)]})
    assert rows[0]["verdict"] == "inconclusive"  # a baseline fits as well: no claim without support


# --- analysis of a width-depth family (synthetic runs with a known law) ----------------------------------

def _fake_study(tmp_path: Path, shapes: list[tuple[int, int]], a0_of, loss_of) -> Path:
    """A study folder as the runner leaves it, with series drawn from the ReLU law around known limits."""
    from sparsinglaw.io import atomic_write_json
    from sparsinglaw.studies.plan import RunSpec

    out = tmp_path / "wd"
    rng = np.random.default_rng(0)
    specs = []
    for d, n in shapes:
        spec = RunSpec(name=f"relu-d{d}-l{n}", preset="tiny", d_model=d, n_layers=n, head_dim=16, activation="relu",
                       tokens=10**9, checkpoints=24, first_checkpoint=0.01, seed=0, seq_len=32, batch_size=4,
                       grad_accum=1, lr=0.01, family="width-depth")
        specs.append(spec.to_dict())
        tokens = np.geomspace(1e7, 1e9, 24)
        a0 = a0_of(d / n)
        ratio = np.exp(-3.0 * (tokens / 1e9) ** 0.5 - 1.0) + a0 + rng.normal(0, 2e-4, 24)
        rd = out / "runs" / spec.name
        atomic_write_json(rd / "series.json", {
            "name": spec.name, "activation": "relu", "non_embedding_params": spec.non_embedding_params,
            "width": d, "depth": n, "tokens": tokens.tolist(), "activation_ratio": ratio.tolist(), "tau": 0.1})
        atomic_write_json(rd / "run.json", {
            "name": spec.name, "spec": spec.to_dict(), "tokens_trained": 10**9, "tokens_per_param": 500.0,
            "epochs": 1.0, "tokens_per_s": 1e6, "mfu": 0.1, "device": "cuda", "dtype": "bf16",
            "final_val_loss": loss_of(d / n), "final_train_loss": 3.0, "times": {}, "loss_curve": [],
            "val_curve": []})
    atomic_write_json(out / "plan.json", {"name": "wd", "description": "", "runs": specs, "data": {},
                                          "tracking": {}})
    return out


def test_width_depth_family_is_fitted_for_ratio_and_loss(tmp_path: Path) -> None:
    from sparsinglaw.studies.analysis import analyse

    def hinge(r, plateau, slope, bp):
        return plateau + slope * np.minimum(r - bp, 0)

    shapes = [(64, 32), (64, 16), (96, 12), (128, 8), (160, 5), (192, 3), (256, 2), (384, 1)]  # r 2 .. 384
    out = _fake_study(tmp_path, shapes, lambda r: hinge(r, 0.08, 0.0004, 40.0),
                      lambda r: hinge(r, 3.0, -0.01, 20.0))
    s = analyse(out, log=lambda _m: None)
    wd = s["width_depth"]
    fit = wd["fit"]
    assert fit["success"] and fit["ci"]["slope"][0] > 0
    assert fit["params"]["plateau"] == pytest.approx(0.08, abs=0.003)
    lf = wd["loss_fit"]
    # independent check: brute-force least squares over breakpoints on the raw losses
    r = np.array([p["ratio"] for p in wd["points"]])
    y = np.array([p["final_val_loss"] for p in wd["points"]])
    best = None
    for bp in np.geomspace(r.min(), r.max(), 4000):
        X = np.stack([np.ones_like(r), np.minimum(r - bp, 0)], 1)
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        sse = float(((X @ coef - y) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, bp, coef)
    assert lf["params"]["breakpoint"] == pytest.approx(best[1], rel=0.05)
    assert lf["params"]["plateau"] == pytest.approx(best[2][0], abs=1e-3)
    assert lf["params"]["slope"] == pytest.approx(best[2][1], rel=0.02)
    assert wd["best_loss_ratio"] >= 20
    assert {r["key"] for r in s["comparison"]} >= {"width-depth", "best-shape"}
    assert next(r for r in s["comparison"] if r["key"] == "width-depth")["verdict"] == "agree"
    page = (out / "report.html").read_text()
    assert "Width-depth ratio" in page and (out / "fits" / "widthdepth.png").is_file()
    assert (out / "figures" / "width_depth_loss.png").is_file()
