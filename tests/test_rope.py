"""The fused RoPE (kernels.rope) against transformers' own apply_rotary_pos_emb of every family it patches.

Kernel tests run through Triton's interpreter on CPU in fp32 (its bf16 is unreliable):
    TRITON_INTERPRET=1 python -m pytest tests/test_rope.py -q
On a GPU the same tests also check bf16 and fp16, bit for bit. Without Triton only the fallback tests run.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from tiny import tiny_model

from sparsinglaw.kernels import rope
from sparsinglaw.sparse import Model, Rule, run_pass

on_gpu = torch.cuda.is_available()
needs_kernel = pytest.mark.skipif(
    rope.triton is None or not (on_gpu or os.environ.get("TRITON_INTERPRET", "0") == "1"),
    reason="needs Triton on a GPU, or its interpreter (TRITON_INTERPRET=1 set before triton is imported)")
DEVICE = "cuda" if on_gpu else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if on_gpu else [torch.float32]


def qkcs(b: int, hq: int, hk: int, s: int, d: int, dtype: torch.dtype, cos_batch: int = 1, seed: int = 0):
    """q, k as the Llama attention makes them (transposed views of (B, S, H, D)), cos/sin as its rotary
    embedding does (computed in fp32 from positions, then cast)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, hq, d, generator=g).to(DEVICE, dtype).transpose(1, 2)
    k = torch.randn(b, s, hk, d, generator=g).to(DEVICE, dtype).transpose(1, 2)
    pos = torch.arange(s).float()[None].repeat(cos_batch, 1) + torch.arange(cos_batch)[:, None] * 7
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    return q, k, ang.cos().to(DEVICE, dtype), ang.sin().to(DEVICE, dtype)


@needs_kernel
@pytest.mark.parametrize("family", sorted(rope.FAMILIES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 4, 2, 5, 8), (1, 3, 3, 17, 6), (3, 6, 1, 4, 16)])
def test_kernel_equals_transformers(family, dtype, shape):
    b, hq, hk, s, d = shape
    original = importlib.import_module(rope.FAMILIES[family]).apply_rotary_pos_emb
    for cos_batch in (1, b):
        q, k, cos, sin = qkcs(b, hq, hk, s, d, dtype, cos_batch)
        want_q, want_k = original(q, k, cos, sin)
        got = rope.apply(q, k, cos, sin)
        assert got is not None
        assert torch.equal(got[0], want_q) and torch.equal(got[1], want_k)
        assert got[0].stride() == q.stride() and got[1].stride() == k.stride()  # attention sees the same layout


@needs_kernel
def test_unservable_calls_fall_back():
    q, k, cos, sin = qkcs(2, 4, 2, 5, 8, torch.float32)
    assert rope.apply(q, k, cos, sin, unsqueeze_dim=2) is None
    assert rope.apply(q, k, cos.double(), sin.double()) is None  # mixed dtypes: torch would promote
    assert rope.apply(q[..., :6], k[..., :6], cos[..., :6], sin[..., :6]) is not None
    assert rope.apply(q, k, cos[..., :6], sin[..., :6]) is None  # head_dim mismatch
    # the patched function hands such calls to the original: (B, S, H, D) tensors, cos/sin unsqueezed at 2
    f = rope.fused(importlib.import_module(rope.FAMILIES["llama"]).apply_rotary_pos_emb)
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    want, got = f.original(qt, kt, cos, sin, 2), f(qt, kt, cos, sin, 2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_patched_only_inside_the_block_and_only_known_families():
    model = tiny_model("llama")
    mod = importlib.import_module(rope.FAMILIES["llama"])
    before = mod.apply_rotary_pos_emb
    with rope.patched(model) as on:
        assert on == (rope.triton is not None)
        if on:
            assert mod.apply_rotary_pos_emb is not before and mod.apply_rotary_pos_emb.original is before
            with rope.patched(model):  # nested: left as found
                pass
            assert mod.apply_rotary_pos_emb.original is before
    assert mod.apply_rotary_pos_emb is before
    with rope.patched(tiny_model("gpt2")) as on:
        assert not on


@needs_kernel
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_run_pass_unchanged(family, monkeypatch):
    """A whole dense and sparse pass gives the same loss and kept counts with and without the kernel."""
    model = tiny_model(family).to(DEVICE)
    m = Model(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    th = torch.full((m.n_layers,), 0.05, device=DEVICE)
    runs = {}
    monkeypatch.setenv("SPARSINGLAW_FUSED_NORM", "0")  # not bit-identical (tests/test_rmsnorm.py): off here
    for flag in ("0", "1"):
        monkeypatch.setenv("SPARSINGLAW_FUSED_ROPE", flag)
        runs[flag] = [run_pass(m, ids, Rule("dense")), run_pass(m, ids, Rule("cett", thresholds=th))]
    for a, b in zip(runs["0"], runs["1"]):
        assert a.loss == b.loss and torch.equal(a.kept, b.kept)
