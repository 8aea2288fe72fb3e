"""A fused RMSNorm for the Llama family, the same arithmetic as transformers' in one read and one write.

transformers' LlamaRMSNorm upcasts to fp32, squares, averages, takes rsqrt, scales, casts back and
multiplies by the weight: six to eight kernels per call, 65 calls per pass of the paper's 1.2B shape,
about 20 of the 137 ms of kernel time of a sparse pass on 16K tokens (H200, `benchmarks/dev/profile_gpu.py
forward`). This kernel does each row in registers:

    var = sum(fp32(x)^2) * (1 / d);  y = dtype(fp32(x) * rsqrt(var + eps));  out = dtype(weight * y)

The only difference from torch is the order in which the d squares are summed (torch's reduction tree
against Triton's), so var can differ in its last fp32 bit and an output element, rarely, by one unit of
its dtype's last place; tests/test_rmsnorm.py bounds it. `patches.fused_norm(model)` installs it on the
Llama family's norm modules for the duration of a block; calls it cannot serve go to the module's own forward.
On by default on CUDA when Triton is importable (`Backend.fused_norm`).
"""

from __future__ import annotations

import torch

from sparsinglaw.kernels import serves

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs have no Triton: transformers' own forward serves
    triton = None



def enabled(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Use the fused kernel for these tensors: Triton present, not turned off, on a GPU (or interpreted),
    no gradient wanted."""
    return triton is not None and serves(x, "fused_norm", *others)


if triton is not None:

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, o_ptr, D, sx, so, inv_d, eps, BD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BD)
        inside = cols < D
        x = tl.load(x_ptr + row * sx + cols, mask=inside, other=0.0)
        dt = x.dtype
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) * inv_d
        y = (xf * tl.math.rsqrt(var + eps)).to(dt)
        w = tl.load(w_ptr + cols, mask=inside, other=0.0)
        tl.store(o_ptr + row * so + cols, (w.to(tl.float32) * y.to(tl.float32)).to(dt), mask=inside)


def apply(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm of x (..., d) with weight (d,); None when the kernel cannot serve this call."""
    if not enabled(x, weight) or weight.dtype != x.dtype or weight.shape != x.shape[-1:] or weight.device != x.device:
        return None
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x.shape[-1] > 65536:
        return None
    d = x.shape[-1]
    flat = x.reshape(-1, d)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if flat.shape[0]:
        bd = triton.next_power_of_2(d)
        _rmsnorm_kernel[(flat.shape[0],)](flat, weight.contiguous(), out, d, flat.stride(0), d, 1.0 / d,
                                          float(eps), BD=bd, num_warps=max(1, min(16, bd // 256)),
                                          enable_fp_fusion=False)
    return out
