"""A fused rotary position embedding for the Llama family's attention, bit-identical to transformers'.

transformers applies RoPE as `q * cos + rotate_half(q) * sin` (and the same for k) on the transposed
(batch, heads, seq, head_dim) views of the projections: a `torch.cat` and five elementwise kernels per
tensor, all on strided memory. On an H200 that was 26-29% of a whole sparse pass of the paper's 0.1B
and 1.2B shapes (16K tokens: 7.7 of 26.6 ms and 35 of 137 ms of kernel time; `benchmarks/dev/profile_gpu.py
forward`). This kernel reads q, k, cos and sin once and writes both outputs, one program per token.

It rounds exactly where torch does: each product `x * cos`, `x * sin` is rounded to the tensors' dtype,
then their sum is (no fused multiply-add), so the outputs equal transformers' bit for bit in bf16, fp16
and fp32. `patches.fused_rope(model)` installs `fused(...)`, for the duration of a block, in place of the
modeling module's `apply_rotary_pos_emb` of the families whose function is the standard one; any call it
cannot serve (CPU tensors, other layouts or dtypes) goes to the original function.
On by default on CUDA when Triton is importable (`Backend.fused_rope`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparsinglaw.kernels import serves

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs have no Triton: transformers' own function serves
    triton = None



def enabled(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Use the fused kernel for these tensors: Triton present, not turned off, on a GPU (or interpreted),
    no gradient wanted."""
    return triton is not None and serves(x, "fused_rope", *others)


if triton is not None:

    @triton.jit
    def _rotate(x_ptr, o_ptr, sxb, sxh, sxs, sob, soh, sos, b, s, c1, c2, s1, s2, H,
                HALF: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
        """Every head of one token: out = (x * cos) + (rotate_half(x) * sin), rounded as torch rounds."""
        hh = tl.arange(0, BH)
        dd = tl.arange(0, BD)
        inside = (hh < H)[:, None] & (dd < HALF)[None, :]
        xo = b * sxb + hh[:, None] * sxh + s * sxs + dd[None, :]
        oo = b * sob + hh[:, None] * soh + s * sos + dd[None, :]
        x1 = tl.load(x_ptr + xo, mask=inside, other=0.0)
        x2 = tl.load(x_ptr + xo + HALF, mask=inside, other=0.0)
        dt = x1.dtype
        # each product rounded to the dtype, then the sum (rotate_half's -x2 is exact)
        a1 = (x1.to(tl.float32) * c1[None, :]).to(dt)
        b1 = (-(x2.to(tl.float32) * s1[None, :])).to(dt)
        a2 = (x2.to(tl.float32) * c2[None, :]).to(dt)
        b2 = (x1.to(tl.float32) * s2[None, :]).to(dt)
        tl.store(o_ptr + oo, (a1.to(tl.float32) + b1.to(tl.float32)).to(dt), mask=inside)
        tl.store(o_ptr + oo + HALF, (a2.to(tl.float32) + b2.to(tl.float32)).to(dt), mask=inside)

    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, S, HQ, HK,
                     sqb, sqh, sqs, skb, skh, sks, sob, soh, sos, srb, srh, srs,
                     scb, scs, HALF: tl.constexpr, BHQ: tl.constexpr, BHK: tl.constexpr, BD: tl.constexpr):
        row = tl.program_id(0)  # one token: (batch, position)
        b = row // S
        s = row % S
        dd = tl.arange(0, BD)
        dm = dd < HALF
        cb = cos_ptr + b * scb + s * scs
        sb = sin_ptr + b * scb + s * scs
        c1 = tl.load(cb + dd, mask=dm, other=0.0).to(tl.float32)
        c2 = tl.load(cb + HALF + dd, mask=dm, other=0.0).to(tl.float32)
        s1 = tl.load(sb + dd, mask=dm, other=0.0).to(tl.float32)
        s2 = tl.load(sb + HALF + dd, mask=dm, other=0.0).to(tl.float32)
        _rotate(q_ptr, qo_ptr, sqb, sqh, sqs, sob, soh, sos, b, s, c1, c2, s1, s2, HQ, HALF, BHQ, BD)
        _rotate(k_ptr, ko_ptr, skb, skh, sks, srb, srh, srs, b, s, c1, c2, s1, s2, HK, HALF, BHK, BD)


def _servable(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> bool:
    """The layout the Llama family passes: (B, H, S, D) q/k with unit stride in D, (B or 1, S, D) cos/sin."""
    if unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    if not (q.dtype == k.dtype == cos.dtype == sin.dtype) or q.dtype not in (torch.bfloat16, torch.float16,
                                                                           torch.float32):
        return False
    bq, _, s, d = q.shape
    if k.shape[0] != bq or k.shape[2:] != (s, d) or cos.shape[1:] != (s, d) or cos.shape[0] not in (1, bq):
        return False
    if d % 2 or q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride() != cos.stride():
        return False
    return all(t.device == q.device for t in (k, cos, sin))


def apply(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor] | None:
    """RoPE on q, k (B, H, S, D) with cos, sin (B or 1, S, D); None when the kernel cannot serve this call.

    The outputs keep q's and k's memory layouts (strided views of (B, S, H, D) stay so), as torch's
    elementwise kernels would, so attention sees the strides it saw before.
    """
    if not (enabled(q, k, cos, sin) and _servable(q, k, cos, sin, unsqueeze_dim)):
        return None
    b, hq, s, d = q.shape
    hk = k.shape[1]
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    if q.numel() == 0:
        return qo, ko
    scb = cos.stride(0) if cos.shape[0] > 1 else 0
    half = d // 2
    _rope_kernel[(b * s,)](q, k, qo, ko, cos, sin, s, hq, hk, *_bhs(q), *_bhs(k), *_bhs(qo), *_bhs(ko),
                           scb, cos.stride(1), HALF=half, BHQ=triton.next_power_of_2(hq),
                           BHK=triton.next_power_of_2(hk), BD=triton.next_power_of_2(half),
                           num_warps=4, enable_fp_fusion=False)
    return qo, ko


def _bhs(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def fused(original: Callable) -> Callable:
    """`original` (a modeling module's apply_rotary_pos_emb) served by the kernel wherever it can be."""
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        out = apply(q, k, cos, sin, unsqueeze_dim)
        return original(q, k, cos, sin, unsqueeze_dim) if out is None else out
    apply_rotary_pos_emb.original = original
    return apply_rotary_pos_emb
