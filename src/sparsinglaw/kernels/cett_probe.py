"""A fused CETT probe: mask, masked down projection and per-token squared norms in one Triton kernel.

`DenseLayers.cett` spends about three quarters of a probe on elementwise traffic: it writes a compare
mask and a masked copy of h, then the bf16 product, and reads them back. This kernel reads h once per
output tile and writes only one fp32 number per token and tile:

    out[g, tile, j] = sum over n in the tile of ( sum_k h[l, j, k] * [|h[l, j, k]| * norms[l, k] <= t_g]
                                                  * W[l, n, k] )^2,   l = layers[g]

The weak test is the reference's own (`a = |h| * norms` in fp32, `a <= t`), computed in registers. The
product is accumulated in fp32 and not rounded to bf16 before squaring, so a CETT value differs from the
unfused path's by the bf16 rounding of the product (about 1e-6 relative, averaged over tokens).

On by default on CUDA when Triton is present (`Backend.fused_probe`). It reads h once instead of writing
and reading a mask, a masked copy and a bf16 product (timings: docs/benchmarks.md). Tested on CPU through
Triton's interpreter (TRITON_INTERPRET=1, `Backend.interpret`).
"""

from __future__ import annotations

import torch

from sparsinglaw.kernels import serves

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs have no Triton: the unfused path serves
    triton = None


def enabled(h: torch.Tensor) -> bool:
    """Use the fused probe for this tensor: Triton present, switched on, and on a GPU (or interpreted)."""
    return triton is not None and serves(h, "fused_probe")


# (BM, BN, BK, num_warps, num_stages): rows, output columns and reduction step of one tile
DEFAULT_CONFIG = (128, 256, 64, 8, 3)  # fastest of 12 on an H200 for d_f 1920 and 4480 (profile_gpu.py)


if triton is not None:

    @triton.jit
    def _probe_kernel(h_ptr, norms_ptr, w_ptr, layers_ptr, t_ptr, out_ptr, y_ptr, M, N, K: tl.constexpr,
                      s_hl, s_hm, s_hk, s_nl, s_nk, s_wl, s_wn, s_wk, s_og, s_on, s_yl, s_ym,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
                      STORE_Y: tl.constexpr):
        # the output tiles of one row block run side by side (axis 0 is fastest), so h stays in L2;
        # K (d_f) is a compile-time constant: one compile per model
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        g = tl.program_id(2)
        layer = tl.load(layers_ptr + g).to(tl.int64)
        t = tl.load(t_ptr + g)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            h = tl.load(h_ptr + layer * s_hl + rm[:, None] * s_hm + kk[None, :] * s_hk,
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            nrm = tl.load(norms_ptr + layer * s_nl + kk * s_nk, mask=kk < K, other=0.0)
            weak = tl.abs(h.to(tl.float32)) * nrm[None, :] <= t
            h = tl.where(weak, h, tl.zeros_like(h))
            w = tl.load(w_ptr + layer * s_wl + rn[None, :] * s_wn + kk[:, None] * s_wk,
                        mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
            if IEEE:  # fp32 models: a true fp32 product, as torch's (Triton would use TF32)
                acc += tl.dot(h, w, input_precision="ieee")
            else:
                acc += tl.dot(h, w)
        if STORE_Y:  # the product itself, for sparse updates to nearby thresholds (kernels.cett_update)
            tl.store(y_ptr + layer * s_yl + rm[:, None] * s_ym + rn[None, :], acc,
                     mask=(rm[:, None] < M) & (rn[None, :] < N))
        sq = tl.sum(acc * acc, axis=1)
        tl.store(out_ptr + g * s_og + pid_n * s_on + rm, sq, mask=rm < M)


def weak_norms(h: torch.Tensor, norms: torch.Tensor, w: torch.Tensor, layers: torch.Tensor,
               t: torch.Tensor, config: tuple[int, int, int, int, int] | None = None,
               y: torch.Tensor | None = None) -> torch.Tensor:
    """(G, m) fp32 norms ||W_down[l] (h[l] masked at t_g)|| per token for the pairs (layers[g], t[g]).

    h: (L, m, d_f); norms: (L, d_f) fp32; w: (L, d_h, d_f) in h's dtype, any strides. y: an (L, m, d_h)
    fp32 tensor (d_h contiguous) that receives each product W_down[l] (h[l] masked at t_g) in y[l]; then
    each layer may appear at most once in `layers`.
    """
    if y is not None and y.stride(2) != 1:
        raise ValueError("weak_norms: y must be contiguous in d_h")
    n_layers, m, k = h.shape
    n = w.shape[1]
    if not h.is_cuda:  # Triton's interpreter
        config = (16, 16, 16, 1, 1)
    elif config is None:  # fp32 tiles take twice the shared memory per element
        config = DEFAULT_CONFIG if h.dtype != torch.float32 else (64, 64, 32, 4, 3)
    bm, bn, bk, warps, stages = config
    n_tiles = triton.cdiv(n, bn)
    out = torch.empty(len(layers), n_tiles, m, device=h.device, dtype=torch.float32)
    grid = (n_tiles, triton.cdiv(m, bm), len(layers))
    ys = (y.stride(0), y.stride(1)) if y is not None else (0, 0)
    _probe_kernel[grid](h, norms, w, layers.to(torch.int32), t.float(), out, out if y is None else y, m, n, k,
                        h.stride(0), h.stride(1), h.stride(2), norms.stride(0), norms.stride(1),
                        w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1), *ys,
                        BM=bm, BN=bn, BK=bk, IEEE=h.dtype == torch.float32, STORE_Y=y is not None,
                        num_warps=warps, num_stages=stages)
    return out.sum(dim=1).sqrt()
