"""Sparse updates of a CETT probe: the masked down projection at a threshold t', from the one at a nearby t.

A threshold search probes each layer at a few thresholds close together: after the first probe of a tau,
its estimates land tens, then single candidates away (`metrics.ThresholdSearch`), and a later tau starts
next to the last one. Between t < t' only the elements with t < a <= t' change side (a = |h| * norms,
the weak test `a <= t`); a few candidates of the 65,536-point grid apart that is 1e-5 to 1e-3 of h. So

    y(t') = y(t) +/- sum over those (token j, neuron k) of h[j, k] * W[:, k]

costs a pass over h (finding them) and over y (updating it), instead of a dense (m x d_f)(d_f x d_h)
product: on an H200 at the 1.2B shape (16K tokens, d_f 4480, d_h 1792) the dense probe takes about
0.75 ms per layer (benchmarks/dev/profile_gpu.py probes).

The products h * W are exact in fp32 (bf16 or fp16 operands), so y(t') differs from a dense probe's
only in the order of its fp32 sums (about 1e-7 relative). Deterministic: `torch.nonzero` lists the
changed elements in order, and each token's row is updated by one program, element after element.

Used by `DenseLayers.cett` where the fused probe serves (`cett_probe.enabled`);
`Backend.probe_updates` switches it (every probe is then a dense product).
"""

from __future__ import annotations

import torch

from sparsinglaw.kernels import cett_probe, switched_on

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs have no Triton: dense probes only
    triton = None

BAND_BLOCK = 4096  # elements of h per program when finding the band
MASK_BYTES = 1 << 30  # the band masks of one launch (one byte per element of h): larger requests are split


def enabled(h: torch.Tensor) -> bool:
    """Sparse updates serve where the fused probe does, unless switched off."""
    return switched_on("probe_updates") and cett_probe.enabled(h)


if triton is not None:

    @triton.jit
    def _band_kernel(h_ptr, norms_ptr, layers_ptr, lo_ptr, hi_ptr, out_ptr, MK, K,
                     s_hl, s_nl, s_og, BLOCK: tl.constexpr):
        # out[g, e] = lo_g < a <= hi_g for element e of layer layers[g] (rows x d_f, contiguous):
        # a is the probe's own fp32(|h|) * norms, so the band is exactly where the weak test changes
        pid = tl.program_id(0)
        g = tl.program_id(1)
        layer = tl.load(layers_ptr + g).to(tl.int64)
        lo = tl.load(lo_ptr + g)
        hi = tl.load(hi_ptr + g)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < MK
        h = tl.load(h_ptr + layer * s_hl + offs, mask=ok, other=0.0)
        nrm = tl.load(norms_ptr + layer * s_nl + offs % K, mask=ok, other=0.0)
        a = tl.abs(h.to(tl.float32)) * nrm
        tl.store(out_ptr + g * s_og + offs, ((a > lo) & (a <= hi)).to(tl.int8), mask=ok)

    @triton.jit
    def _update_kernel(y_ptr, w_ptr, h_ptr, layers_ptr, sign_ptr, crow_ptr, cols_ptr, out_ptr, M, N: tl.constexpr,
                       s_yl, s_ym, s_wl, s_wn, s_wk, s_hl, s_hm, BN: tl.constexpr):
        # one token row r of request g: y[l, r] += sign * sum over its band elements k of h[l, r, k] W[l, :, k],
        # in place, and out[g, r] = ||y[l, r]||^2; N (d_h) is a compile-time constant: one compile per model
        r = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        layer = tl.load(layers_ptr + g).to(tl.int64)
        sign = tl.load(sign_ptr + g)
        row = g.to(tl.int64) * M + r
        start = tl.load(crow_ptr + row)
        end = tl.load(crow_ptr + row + 1)
        sq = 0.0
        for n0 in range(0, N, BN):
            rn = n0 + tl.arange(0, BN)
            ok = rn < N
            yp = y_ptr + layer * s_yl + r * s_ym + rn
            acc = tl.load(yp, mask=ok, other=0.0)
            j = start
            while j < end:  # (a while loop: Triton's interpreter cannot range over loaded bounds)
                k = tl.load(cols_ptr + j).to(tl.int64)
                v = tl.load(h_ptr + layer * s_hl + r * s_hm + k).to(tl.float32) * sign
                acc += v * tl.load(w_ptr + layer * s_wl + rn * s_wn + k * s_wk, mask=ok, other=0.0).to(tl.float32)
                j += 1
            tl.store(yp, acc, mask=ok)
            sq += tl.sum(acc * acc, axis=0)
        tl.store(out_ptr + row, sq)


def band(h: torch.Tensor, norms: torch.Tensor, layers: torch.Tensor, lo: torch.Tensor,
         hi: torch.Tensor) -> torch.Tensor:
    """(E, 3) int64 (request g, token r, neuron k) of every element with lo[g] < a <= hi[g] in layer
    layers[g], in order (as torch.nonzero lists them). h: (L, m, d_f), each layer contiguous."""
    n_layers, m, k = h.shape
    if h.stride(2) != 1 or h.stride(1) != k:
        raise ValueError("band: each layer of h must be contiguous (m, d_f)")
    per = max(1, MASK_BYTES // (m * k))
    block = BAND_BLOCK if h.is_cuda else 64
    found = []
    for g0 in range(0, len(layers), per):
        sl = slice(g0, g0 + per)
        mask = torch.empty(len(layers[sl]), m * k, device=h.device, dtype=torch.bool)
        grid = (triton.cdiv(m * k, block), len(layers[sl]))
        _band_kernel[grid](h, norms, layers[sl].to(torch.int32), lo[sl].float(), hi[sl].float(), mask.view(torch.int8),
                           m * k, k, h.stride(0), norms.stride(0), mask.stride(0),
                           BLOCK=block)
        idx = torch.nonzero(mask)  # (E, 2): request within the chunk, flat element
        found.append(torch.stack([idx[:, 0] + g0, idx[:, 1] // k, idx[:, 1] % k], dim=1))
    return torch.cat(found)


def update(y: torch.Tensor, h: torch.Tensor, w: torch.Tensor, layers: torch.Tensor, old: torch.Tensor,
           new: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Move y[layers[g]] from threshold old[g] to new[g] in place (each layer at most once), and return
    the (G, m) fp32 norms ||y[layers[g], r]|| after the move.

    y: (L, m, d_h) fp32, y[l] = W[l] (h[l] masked at old); h: (L, m, d_f); w: (L, d_h, d_f), any strides
    (d_h contiguous is fastest: each changed element reads one column of W); norms: (L, d_f) fp32.
    """
    n_layers, m, _ = h.shape
    n = y.shape[2]
    lo, hi = torch.minimum(old, new), torch.maximum(old, new)
    sign = torch.where(new > old, 1.0, -1.0).to(device=h.device, dtype=torch.float32)
    idx = band(h, norms, layers, lo, hi)
    counts = torch.bincount(idx[:, 0] * m + idx[:, 1], minlength=len(layers) * m)
    crow = torch.zeros(len(layers) * m + 1, device=h.device, dtype=torch.int64)
    torch.cumsum(counts, 0, out=crow[1:])
    cols = idx[:, 2].contiguous()
    out = torch.empty(len(layers), m, device=h.device, dtype=torch.float32)
    bn = min(1024, triton.next_power_of_2(n)) if h.is_cuda else 16
    _update_kernel[(m, len(layers))](y, w, h, layers.to(torch.int32), sign, crow, cols, out, m, n,
                                     y.stride(0), y.stride(1), w.stride(0), w.stride(1), w.stride(2),
                                     h.stride(0), h.stride(1), BN=bn)
    return out.sqrt()
