"""The `Backend` settings: parsed once from --backend, made current for the work, recorded in every result."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli_measure import _common, run

from sparsinglaw.backend import Backend, current, using
from sparsinglaw.errors import UserError
from sparsinglaw.sparse import Model, Rule, run_pass


def test_parse_switches_and_plain():
    b = Backend.parse("cuda_graphs=off, fused-rope=0", base=Backend())
    assert not b.cuda_graphs and not b.fused_rope and b.fused_probe
    assert Backend.parse("", base=b) == b
    plain = Backend.parse("plain,fused_mask=on", base=Backend(interpret=True))
    assert plain.fused_mask and not plain.fused_probe and plain.interpret  # the interpreter is not a switch
    for bad in ("graphs=off", "cuda_graphs", "cuda_graphs=maybe"):
        with pytest.raises(UserError, match="--backend"):
            Backend.parse(bad)


def test_using_restores_the_previous_backend():
    before = current()
    with using(Backend.plain()) as b:
        assert current() is b and not b.cuda_graphs
        with using(None) as inner:  # None keeps the one in force
            assert inner is b
    assert current() is before


def test_plain_backend_gives_the_same_pass_on_cpu(tiny_model):
    # on CPU without the interpreter no kernel serves, so every switch must leave a pass bit for bit alone
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    th = torch.full((2,), 0.05)
    with using(Backend()):
        on = run_pass(Model(model), ids, Rule("cett", thresholds=th), detail=True)
    with using(Backend.plain()):
        off = run_pass(Model(model), ids, Rule("cett", thresholds=th), detail=True)
    assert on.loss == off.loss and torch.equal(on.kept, off.kept)


def test_cli_records_the_backend_and_rejects_a_bad_one(tiny_dir, tmp_path, capsys):
    model_dir = tiny_dir("llama", act="relu")
    out = tmp_path / "out"
    args = ["measure", *_common(model_dir, out), "--metric", "cett", "--tau", "0.2"]
    assert run([*args, "--backend", "cuda_graphs=off,fused_rope=off"]) == 0
    recorded = json.loads((out / "measurement.json").read_text())["backend"]
    assert recorded == {**Backend(interpret=current().interpret).to_json(), "cuda_graphs": False,
                        "fused_rope": False}
    capsys.readouterr()
    assert run([*args, "--backend", "graphs=off"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--backend" in err[0]


def test_the_public_api_imports_from_the_package():
    import sparsinglaw

    for name in sparsinglaw.__all__:
        assert getattr(sparsinglaw, name) is not None, name
    from sparsinglaw import Backend as B
    from sparsinglaw import measure

    assert B is Backend and measure.__module__ == "sparsinglaw.measure"
    with pytest.raises(AttributeError):
        sparsinglaw.no_such_name  # noqa: B018
