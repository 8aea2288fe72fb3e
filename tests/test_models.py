"""Loading models: saved folders, device and dtype choices, every bad input as a UserError; SmolLM2 (slow)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import tiny
import torch

from sparsinglaw import models
from sparsinglaw.errors import UserError
from sparsinglaw.models import cache_dir, load_model, resolve_device, resolve_dtype
from sparsinglaw.sites import activation_name, ffn_sites


def test_load_saved_folder_cpu_fp32_by_default(tiny_dir):
    path = tiny_dir("llama")
    lm = load_model(str(path), device="cpu")
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32 and lm.name == path.name
    assert not lm.model.training
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    assert lm.tokenizer.eos_token_id == 0
    ids = torch.tensor([lm.tokenizer("The for statement")["input_ids"]])
    with torch.no_grad():  # the weights survive the round trip
        assert torch.allclose(lm.model(ids).logits, tiny.tiny_model("llama")(ids).logits, atol=1e-5)
    assert len(ffn_sites(lm.model)) == tiny.LAYERS


@pytest.mark.parametrize("family", ["gpt2", "opt", "gemma2"])
def test_load_other_families(tiny_dir, family):
    lm = load_model(str(tiny_dir(family, act="relu")), device="cpu", dtype="fp32")
    assert lm.model.config.model_type == family
    assert activation_name(lm.model) == "relu"


@pytest.mark.parametrize("dtype", ["bf16", "bfloat16"])
def test_load_bf16_when_asked(tiny_dir, dtype):
    lm = load_model(str(tiny_dir("qwen3")), device="cpu", dtype=dtype)
    assert lm.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    assert ffn_sites(lm.model)[0].column_norms().dtype == torch.float32


def test_name_of_dot_and_home_relative_paths(tiny_dir, monkeypatch):
    path = tiny_dir("llama")
    monkeypatch.chdir(path)
    assert load_model(".", device="cpu").name == path.name
    monkeypatch.setenv("HOME", str(path.parent))
    assert load_model(f"~/{path.name}", device="cpu").name == path.name


@pytest.mark.parametrize("spec", ["/definitely/not/here", "./not-here", "a/b/c", "~/not-here-either",
                                  "missing.gguf"])
def test_missing_path_is_a_user_error(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_model(spec, device="cpu")


def test_folder_without_config_is_a_user_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(UserError, match="config.json"):
        load_model(str(tmp_path), device="cpu")


def test_plain_file_is_a_user_error(tmp_path):
    f = tmp_path / "model.txt"
    f.write_text("hello")
    with pytest.raises(UserError, match="config.json"):
        load_model(str(f), device="cpu")


def test_broken_folders_are_user_errors(tiny_dir):
    path = tiny_dir("llama")
    no_tok = shutil.copytree(path, path.with_name("no-tokenizer"))
    for f in no_tok.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(UserError, match="tokenizer"):
        load_model(str(no_tok), device="cpu")
    no_weights = shutil.copytree(path, path.with_name("no-weights"))
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(UserError, match="could not load model"):
        load_model(str(no_weights), device="cpu")
    unknown = shutil.copytree(path, path.with_name("unknown-type"))
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**cfg, "model_type": "no_such_family"}))
    with pytest.raises(UserError, match="no_such_family"):
        load_model(str(unknown), device="cpu")
    bad_json = shutil.copytree(path, path.with_name("bad-json"))
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(UserError):
        load_model(str(bad_json), device="cpu")


def test_cuda_without_gpu_is_a_user_error(tiny_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for dev in ("cuda", "cuda:1"):
        with pytest.raises(UserError, match="--device cpu"):
            resolve_device(dev)
    with pytest.raises(UserError, match="CUDA"):
        load_model(str(tiny_dir("llama")), device="cuda")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_bad_device_is_a_user_error():
    with pytest.raises(UserError, match="tpu"):
        resolve_device("tpu")


def test_dtypes(tiny_dir):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("fp16", cpu) == resolve_dtype("float16", cpu) == torch.float16
    assert resolve_dtype("float32", cuda) == torch.float32
    for bad in ("int8", "fp64", "", "BF16x"):
        with pytest.raises(UserError, match="--dtype"):
            resolve_dtype(bad, cpu)
    with pytest.raises(UserError, match="--dtype"):
        load_model(str(tiny_dir("llama")), device="cpu", dtype="float64")


def test_an_unfetched_builtin_says_how_to_fetch_it(monkeypatch, tmp_path):
    # nothing is installed at load time: a built-in model that was never fetched is a one-line error
    monkeypatch.setenv("SPARSINGLAW_CACHE", str(tmp_path))
    monkeypatch.setattr(models.md, "files", lambda dist: [])
    with pytest.raises(UserError, match="sparsinglaw fetch smollm2-135m"):
        load_model(models.SMOLLM2["name"], device="cpu")
    with pytest.raises(UserError, match="unknown built-in"):
        models.fetch("gpt-5")
    assert not any(tmp_path.iterdir())


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSINGLAW_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("SPARSINGLAW_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == Path(tmp_path) / ".cache" / "sparsinglaw"


@pytest.mark.slow
def test_smollm2_builtin():
    """The built-in SmolLM2-135M: first run converts the wheel's GGUF into the default cache (~1 min)."""
    from sparsinglaw.data import eval_batches

    models.fetch(models.SMOLLM2["name"])
    lm = load_model(models.SMOLLM2["name"], device="cpu")
    assert type(lm.model).__name__ == "LlamaForCausalLM" and lm.dtype == torch.float32
    sites = ffn_sites(lm.model)
    assert len(sites) == 30 and all(s.d_ff == 1536 and s.gated for s in sites)
    assert activation_name(lm.model) == "silu"
    assert (cache_dir() / "models" / models.SMOLLM2["cache"] / "DONE").exists()
    (ids,) = eval_batches(lm.tokenizer, None, tokens=512, seq_len=256, batch_size=2)
    with torch.no_grad():
        loss = lm.model(input_ids=ids, labels=ids).loss.item()
    assert math.isfinite(loss) and loss < 6, loss
