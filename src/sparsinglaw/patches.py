"""Every change this package makes to transformers while it runs a pass, in one place, each undone on exit.

- `causal_attention`: a Llama-family model on SDPA attends through `is_causal=True` without a mask.
- `fused_rope`: the family's `apply_rotary_pos_emb` runs through `kernels.rope` (bit-identical).
- `fused_norm`: the family's RMSNorm modules run through `kernels.rmsnorm`.
- `passes(model, seq)`: all three, as `run_pass` and `sparsify` enter them.

Each relies on transformers internals (modeling module paths, `AttentionInterface`,
`config._attn_implementation`, norm class names) checked on the versions in TESTED. On any other version
`supported()` is False and every patch is a no-op: passes take transformers' own path, with the same
results up to rounding, only slower on a GPU. Each patch also has a switch in `backend.Backend`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterator

import torch

from sparsinglaw.backend import current

TESTED = ((5, 10), (5, 25))  # oldest and newest transformers minor versions the tests pass on

# model_type -> modeling module whose apply_rotary_pos_emb is `q * cos + rotate_half(q) * sin` with cos/sin
# unsqueezed at dim 1 (tests/test_rope.py checks each against the kernel)
ROPE_FAMILIES = {t: f"transformers.models.{t}.modeling_{t}" for t in ("llama", "mistral", "qwen2", "qwen3")}
# norm classes whose forward is `weight * normed` in fp32 with eps in `variance_epsilon` (kernels/rmsnorm.py)
NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
# full causal attention through create_causal_mask
CAUSAL_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
CAUSAL_SDPA = "sparsinglaw_causal_sdpa"  # torch SDPA under a name transformers builds no mask for


@functools.cache
def supported(version: str | None = None) -> bool:
    """transformers (this `version`, default the installed one) is one the patches were tested on."""
    if version is None:
        import transformers

        version = transformers.__version__
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return TESTED[0] <= major_minor <= TESTED[1]


@contextlib.contextmanager
def passes(model: torch.nn.Module, seq: int | None = None) -> Iterator[None]:
    """Every patch that serves `model` for a block of forward passes; `seq`: whole unpadded, uncached
    sequences of this length (as `run_pass` runs them), which the causal-attention patch needs; None for
    arbitrary calls (generation), where it stays off."""
    with fused_rope(model), fused_norm(model), causal_attention(model, seq):
        yield


def _model_type(model: torch.nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


@contextlib.contextmanager
def fused_rope(model: torch.nn.Module) -> Iterator[bool]:
    """Inside this block, `model`'s family (when in ROPE_FAMILIES) applies RoPE through the fused kernel.

    Yields whether it did. The patch is on the modeling module (where attention looks the function up), so
    it is undone on exit, and nested blocks leave it as they found it. Calls the kernel cannot serve (CPU
    tensors, other layouts) go to transformers' function."""
    from sparsinglaw.kernels import rope, switched_on

    mtype = _model_type(model)
    if mtype not in ROPE_FAMILIES or not supported() or not switched_on("fused_rope"):
        yield False
        return
    mod = importlib.import_module(ROPE_FAMILIES[mtype])
    before = getattr(mod, "apply_rotary_pos_emb", None)
    if before is None or hasattr(before, "original"):  # not there, or already ours (a nested block)
        yield before is not None
        return
    mod.apply_rotary_pos_emb = rope.fused(before)
    try:
        yield True
    finally:
        mod.apply_rotary_pos_emb = before


@contextlib.contextmanager
def fused_norm(model: torch.nn.Module) -> Iterator[int]:
    """Inside this block, `model`'s RMSNorm modules of the NORM_CLASSES run through the kernel; yields how
    many. Calls the kernel cannot serve go to the module's own forward."""
    from sparsinglaw.kernels import rmsnorm, switched_on

    if not supported() or not switched_on("fused_norm"):
        yield 0
        return
    mods = [mod for mod in model.modules() if type(mod).__name__ in NORM_CLASSES and "forward" not in vars(mod)
            and hasattr(mod, "variance_epsilon")]
    for mod in mods:
        def forward(x, mod=mod, own=mod.forward):
            out = rmsnorm.apply(x, mod.weight, mod.variance_epsilon)
            return own(x) if out is None else out
        mod.forward = forward
    try:
        yield len(mods)
    finally:
        for mod in mods:
            vars(mod).pop("forward", None)


def _causal_sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@contextlib.contextmanager
def causal_attention(model: torch.nn.Module, seq: int | None) -> Iterator[bool]:
    """Inside this block, a Llama-family model on SDPA attends through `is_causal=True` without building a
    mask, as transformers does itself for an unpadded batch with no cache, but also under CUDA stream
    capture, where it would otherwise build the causal mask (it cannot check the padding there) and SDPA
    would take a slower kernel whose rounding differs. So a graphed pass equals an eager one. Only for
    whole sequences (`seq` tokens) with no padding mask and no cache, and no sliding window shorter than
    them; elsewhere a no-op. Yields whether it applied."""
    cfg = getattr(model, "config", None)
    window = getattr(cfg, "sliding_window", None)
    sliding = seq is not None and window is not None and seq > window and (  # a window as long as the
        "sliding_attention" in (getattr(cfg, "layer_types", None) or ["sliding_attention"]))  # sequence is causal
    if (seq is None or cfg is None or not supported() or not current().causal_sdpa
            or getattr(cfg, "model_type", None) not in CAUSAL_FAMILIES or sliding
            or cfg._attn_implementation != "sdpa" or not getattr(cfg, "is_causal", True)):
        yield False
        return
    from transformers import AttentionInterface

    AttentionInterface.register(CAUSAL_SDPA, _causal_sdpa)
    cfg._attn_implementation = CAUSAL_SDPA
    try:
        yield True
    finally:
        cfg._attn_implementation = "sdpa"
