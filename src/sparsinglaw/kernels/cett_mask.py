"""A fused CETT mask for sparse forward passes: weak test, masked h and kept counts in one Triton kernel.

In torch, a CETT pass spends about 7 ms per 16-layer pass (16K tokens, d_f 1,920, H200) on elementwise
traffic: abs, compare, select, two reductions and dtype copies, each a full read (and often a
write) of h. This kernel reads h once and writes the masked h plus two small int32 count vectors:

    keep[r, k] = not ( fp32(|h[r, k]|) * norms[k] <= t )            (NaN is kept, as in `not (a <= t)`)
    out[r, k]  = h[r, k] if keep[r, k] else 0
    col[k]     = sum over counted rows r of keep[r, k]              (per-neuron kept counts)
    rows[r]    = sum over k of keep[r, k], for the first `row_counts` rows (per-token kept counts)

The weak test is the reference's own (`a = |h| * norms` in fp32, `a <= t`, see `DenseLayers.cett`),
computed in registers, so the kept counts equal those of the torch path (`metrics.keep_cett`) exactly.
Counted rows: every row, or (`seq` given, positions "labeled") every row but the last of each sequence.

On by default on CUDA when Triton is importable (`Backend.fused_mask`; off, the torch path serves).
Tested on CPU through Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported).
"""

from __future__ import annotations

import torch

from sparsinglaw.kernels import serves

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs have no Triton: the torch path serves
    triton = None

# (rows, columns) of one tile. On a GPU 32 x 256 bf16 is 16 KB per tile (16-byte vector loads, 512
# contiguous bytes per warp and row); small tiles on the interpreter keep CPU tests quick and make odd
# sizes cross several blocks in both directions.
GPU_BLOCKS = (32, 256)
CPU_BLOCKS = (8, 16)
TARGET_PROGRAMS = 1024  # enough programs to fill 132 SMs several times over; more only adds atomics
MAX_TILES = 64


def enabled(h: torch.Tensor) -> bool:
    """Use the fused kernel for this tensor: Triton present, not turned off, and on a GPU (or interpreted)."""
    return triton is not None and serves(h, "fused_mask")


def tiles_per_program(row_tiles: int, col_blocks: int) -> int:
    """Row tiles each program walks (a power of two, so few specialisations): about TARGET_PROGRAMS
    programs in all, because every program ends with one atomic add per column of its block."""
    tiles = 1
    while tiles < MAX_TILES and -(-row_tiles // (2 * tiles)) * col_blocks >= TARGET_PROGRAMS:
        tiles *= 2
    return tiles


if triton is not None:

    @triton.jit
    def _mask_kernel(h_ptr, out_ptr, norms_ptr, t_ptr, col_ptr, row_ptr, M, N, s_hm, s_om, seq, row_limit,
                     LABELED: tl.constexpr, HAS_ROWS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     TILES: tl.constexpr):
        # axis 0 walks row groups (no 65,535 limit there, for up to millions of rows), axis 1 column
        # blocks; TILES is a power of two (a handful of compiles at most) and a loop bound, not unrolled
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        nmask = rn < N
        nrm = tl.load(norms_ptr + rn, mask=nmask, other=0.0)
        t = tl.load(t_ptr)
        colacc = tl.zeros((BN,), dtype=tl.int32)
        for j in range(0, TILES):
            rm = (pid_m * TILES + j) * BM + tl.arange(0, BM)
            mmask = rm < M
            inside = mmask[:, None] & nmask[None, :]
            rm64 = rm.to(tl.int64)  # rows x d_f passes 2**31 at a million rows
            h = tl.load(h_ptr + rm64[:, None] * s_hm + rn[None, :], mask=inside, other=0.0)
            weak = tl.abs(h.to(tl.float32)) * nrm[None, :] <= t
            keep = (~weak) & inside
            tl.store(out_ptr + rm64[:, None] * s_om + rn[None, :], tl.where(keep, h, tl.zeros_like(h)),
                     mask=inside)
            k32 = keep.to(tl.int32)
            if HAS_ROWS:
                tl.atomic_add(row_ptr + rm, tl.sum(k32, axis=1), mask=rm < row_limit, sem="relaxed")
            if LABELED:  # the last position of each sequence has no label: not counted
                k32 = tl.where(((rm % seq) != (seq - 1))[:, None], k32, 0)
            colacc += tl.sum(k32, axis=0)
        tl.atomic_add(col_ptr + rn, colacc, mask=nmask, sem="relaxed")


def apply(h: torch.Tensor, norms: torch.Tensor, t: torch.Tensor | float, seq: int | None = None,
          row_counts: int = 0, blocks: tuple[int, int] | None = None,
          tiles: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask h (..., d_f) at threshold t; returns (masked h, col (d_f,) int32, rows (row_counts,) int32).

    norms: (d_f,) column norms of W_down; t: a threshold (a 0-d tensor stays on the device: no sync);
    seq: count only rows whose position in their sequence of `seq` is not the last ('labeled');
    row_counts: how many leading rows get per-row kept counts (the first sequence, for token ratios);
    blocks, tiles: tile shape and row tiles per program (tests; chosen from the device otherwise).
    """
    d_f = h.shape[-1]
    flat = h.reshape(-1, d_f)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    m = flat.shape[0]
    row_counts = min(row_counts, m)
    out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    counts = torch.zeros(d_f + row_counts, dtype=torch.int32, device=h.device)  # one memset for both
    col, rows = counts[:d_f], counts[d_f:]
    if m == 0 or d_f == 0:
        return out, col, rows
    norms = norms.to(device=h.device, dtype=torch.float32).contiguous()
    t = torch.as_tensor(t).to(device=h.device, dtype=torch.float32)
    bm, bn = blocks or (GPU_BLOCKS if h.is_cuda else CPU_BLOCKS)
    row_tiles, col_blocks = triton.cdiv(m, bm), triton.cdiv(d_f, bn)
    tiles = tiles or tiles_per_program(row_tiles, col_blocks)
    grid = (triton.cdiv(row_tiles, tiles), col_blocks)
    _mask_kernel[grid](flat, out, norms, t, col, rows, m, d_f, flat.stride(0), d_f, seq or 1, row_counts,
                       LABELED=seq is not None, HAS_ROWS=row_counts > 0, BM=bm, BN=bn, TILES=tiles,
                       num_warps=4)
    return out, col, rows
