"""The fused RMSNorm (kernels.rmsnorm) against the norm modules of every family it patches.

Kernel tests run through Triton's interpreter on CPU in fp32 (its bf16 is unreliable):
    TRITON_INTERPRET=1 python -m pytest tests/test_rmsnorm.py -q
On a GPU the same tests also check bf16 and fp16. Without Triton only the patching test runs.
"""

from __future__ import annotations

import importlib

import pytest
import tiny
import torch
from tiny import passes_switched, tiny_model

from sparsinglaw import patches
from sparsinglaw.kernels import rmsnorm

needs_kernel = tiny.needs_kernel(rmsnorm)
DEVICE, DTYPES = tiny.KERNEL_DEVICE, tiny.KERNEL_DTYPES
MODULES = {"LlamaRMSNorm": "llama", "MistralRMSNorm": "mistral", "Qwen2RMSNorm": "qwen2", "Qwen3RMSNorm": "qwen3"}


def ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| in units of want's last place (its dtype's)."""
    eps = torch.finfo(want.dtype).eps
    return (got.double() - want.double()).abs() / (want.double().abs() * eps).clamp(min=torch.finfo(want.dtype).tiny)


@needs_kernel
@pytest.mark.parametrize("cls", sorted(patches.NORM_CLASSES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [8, 48, 100])
def test_kernel_matches_the_module(cls, dtype, d):
    mod = getattr(importlib.import_module(f"transformers.models.{MODULES[cls]}.modeling_{MODULES[cls]}"), cls)
    norm = mod(d, eps=1e-5).to(DEVICE, dtype)
    g = torch.Generator().manual_seed(d)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=g))
        x = (torch.randn(3, 7, d, generator=g) * 3).to(DEVICE, dtype)
        want = norm(x)
        got = rmsnorm.apply(x, norm.weight, norm.variance_epsilon)
    assert got is not None and got.dtype == want.dtype and got.shape == want.shape
    # only the order of the d squares' sum (and rsqrt's last bit) differ: through two roundings (x * rsqrt,
    # then times the weight) that moves an output by under three units of eps relative, on a few elements
    assert float(ulps(got, want).max()) <= 3.0
    if dtype != torch.float32:  # in fp32 a row whose var moved moves whole; bf16/fp16 rounding absorbs most
        assert float((got != want).float().mean()) < 0.05


@needs_kernel
def test_unservable_calls_return_none():
    x = torch.randn(4, 8, device=DEVICE)
    assert rmsnorm.apply(x, torch.ones(8, device=DEVICE, dtype=torch.float64), 1e-6) is None  # torch would promote
    assert rmsnorm.apply(x, torch.ones(6, device=DEVICE), 1e-6) is None
    assert rmsnorm.apply(x[:, ::2], torch.ones(4, device=DEVICE), 1e-6) is not None  # strided rows are copied
    w = torch.nn.Parameter(torch.ones(8, device=DEVICE))  # autograd wants a gradient: the module's own path
    assert rmsnorm.apply(x, w, 1e-6) is None
    with torch.no_grad():
        assert rmsnorm.apply(x, w, 1e-6) is not None


@pytest.mark.skipif(not patches.supported(), reason="a transformers version the patches do not know: they step aside")
def test_patched_only_inside_the_block():
    model = tiny_model("llama")
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    with patches.fused_norm(model) as n:
        assert n == (len(norms) if rmsnorm.triton is not None else 0)
        assert all(("forward" in vars(m)) == (n > 0) for m in norms)
    assert not any("forward" in vars(m) for m in norms)
    with patches.fused_norm(tiny_model("gpt2")) as n:
        assert n == 0


@needs_kernel
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_run_pass_close(family):
    """A whole pass with the kernel: the same loss to rounding, the same kept counts to a few neurons."""
    runs = passes_switched(family, "fused_norm", DEVICE)
    for a, b in zip(runs["0"], runs["1"]):
        assert abs(a.loss - b.loss) <= 1e-5 * abs(a.loss)
        assert float((a.kept - b.kept).abs().max()) <= 2
