"""The fused RoPE (kernels.rope) against transformers' own apply_rotary_pos_emb of every family it patches.

Kernel tests run through Triton's interpreter on CPU in fp32 (its bf16 is unreliable):
    TRITON_INTERPRET=1 python -m pytest tests/test_rope.py -q
On a GPU the same tests also check bf16 and fp16, bit for bit. Without Triton only the fallback tests run.
"""

from __future__ import annotations

import importlib

import pytest
import tiny
import torch
from tiny import passes_switched, tiny_model

from sparsinglaw import patches
from sparsinglaw.kernels import rope

needs_kernel = tiny.needs_kernel(rope)
DEVICE, DTYPES = tiny.KERNEL_DEVICE, tiny.KERNEL_DTYPES


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
@pytest.mark.parametrize("family", sorted(patches.ROPE_FAMILIES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 4, 2, 5, 8), (1, 3, 3, 17, 6), (3, 6, 1, 4, 16)])
def test_kernel_equals_transformers(family, dtype, shape):
    b, hq, hk, s, d = shape
    original = importlib.import_module(patches.ROPE_FAMILIES[family]).apply_rotary_pos_emb
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
    assert rope.apply(q.detach().requires_grad_(), k, cos, sin) is None  # no backward: autograd's path
    # the patched function hands such calls to the original: (B, S, H, D) tensors, cos/sin unsqueezed at 2
    f = rope.fused(importlib.import_module(patches.ROPE_FAMILIES["llama"]).apply_rotary_pos_emb)
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    want, got = f.original(qt, kt, cos, sin, 2), f(qt, kt, cos, sin, 2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.skipif(not patches.supported(), reason="a transformers version the patches do not know: they step aside")
def test_patched_only_inside_the_block_and_only_known_families():
    model = tiny_model("llama")
    mod = importlib.import_module(patches.ROPE_FAMILIES["llama"])
    before = mod.apply_rotary_pos_emb
    with patches.fused_rope(model) as on:
        assert on == (rope.triton is not None)
        if on:
            assert mod.apply_rotary_pos_emb is not before and mod.apply_rotary_pos_emb.original is before
            with patches.fused_rope(model):  # nested: left as found
                pass
            assert mod.apply_rotary_pos_emb.original is before
    assert mod.apply_rotary_pos_emb is before
    with patches.fused_rope(tiny_model("gpt2")) as on:
        assert not on


@needs_kernel
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_run_pass_unchanged(family):
    """A whole dense and sparse pass gives the same loss and kept counts with and without the kernel."""
    # the fused RMSNorm is not bit-identical (tests/test_rmsnorm.py): off here
    runs = passes_switched(family, "fused_rope", DEVICE, off=("fused_norm",))
    for a, b in zip(runs["0"], runs["1"]):
        assert a.loss == b.loss and torch.equal(a.kept, b.kept)
