"""The paper's sparsity metrics as keep-masks, and CETT's threshold search (docs/science.md).

Conventions: h is the input of the down projection (m tokens x d_f), s the activation output,
`norms` the fp32 column norms of W_down, so neuron i's output norm is a_i = |h_i| * norms_i.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Generator
from dataclasses import dataclass, field

import torch

GRID_POINTS = 65536  # the authors' candidate count per layer
# CETT threshold search: uncertainties of the crossing's estimates, in candidates (measured on SmolLM2-135M,
# benchmarks/dev/threshold_probes.py; CETT grows as about t^1.2 and is smooth down to a single candidate)
HINT_SPREAD = 0.005  # another batch's threshold: relative (batches of one layer differ by 0.1-5%)
SHIFT_SPREAD = (0.0002, 0.01)  # the same, corrected by this batch's offset at tau_then: a + b |ln(tau / tau_then)|
INTERP_SIGMA = (0.3, 300.0)  # power law between measured bracket ends w apart: a + (w / b)^2 (noise, curvature)
EXTRAP_SIGMA = (0.5, 0.03)  # power law through a point d away: a + b d (the exponent's error)
CLOSE_SIGMA = 0.6  # below this, probe the two candidates around the estimate: they usually close the bracket
DEFAULT_K = 1.25  # CETT ~ t^k before any exponent is measured (1.0-1.35 on SmolLM2-135M, 1.2-1.3 typical)
FIT_WINDOW = 0.3  # exponent fitted to the points within this of ln t
UPDATE_SHARE = 0.01  # a probe whose band (a between it and the kept product) holds less of h is an update
# ... and only where d_h is this wide: a narrower product is as cheap as an update's pass over h and y (H200,
# per layer at 16K tokens: d_h 768, 0.10 ms dense vs 0.145 ms update; d_h 1792, 0.52 vs 0.34 ms)
UPDATE_MIN_DH = 1536
SAMPLE_SIZE = 65536  # a values per layer sampled to estimate that share (1.5e-5 resolution)
MODEL_STEPS = 16  # then bisection only: the worst case stays at 2 x 16 steps


def grid_stride(numel: int) -> int:
    """The authors' subsampling stride for the grid's top: `max(numel // 65536, 1)` over the row-major
    (tokens x d_f) matrix of neuron output norms. Where it divides d_f, the subsample is whole neuron
    columns (every stride-th column, all tokens of each: 32 columns of SmolLM2-135M at 2,048 tokens, one at
    64K), not a spread over the matrix. A quirk of theirs, kept so that the candidates equal theirs."""
    return max(numel // GRID_POINTS, 1)


# --- keep-masks of the four metrics (True = neuron kept) -------------------------------------------

def keep_zero(s: torch.Tensor) -> torch.Tensor:
    return s != 0


def keep_fat(s: torch.Tensor, eps: float) -> torch.Tensor:
    """FAT-eps: D = {i : |s_i| < eps}, on the activation output s (not on h)."""
    return s.abs() >= eps


def topk_pooled_threshold(s: torch.Tensor, k: float) -> torch.Tensor:
    """|s| value of the k-quantile from the top over the whole (tokens x d_f) tensor (authors' code)."""
    flat = s.detach().abs().flatten()
    keep = max(1, min(flat.numel(), round(k * flat.numel())))
    return flat.float().kthvalue(flat.numel() - keep + 1).values


def keep_topk_pooled(s: torch.Tensor, k: float) -> torch.Tensor:
    return s.abs() >= topk_pooled_threshold(s, k).to(s.dtype)


def keep_topk_per_token(s: torch.Tensor, k: float) -> torch.Tensor:
    """Top-k per token: keep the round(k * d_f) largest |s_i| of every token (the paper's prose)."""
    kk = max(1, min(s.shape[-1], round(k * s.shape[-1])))
    idx = s.abs().topk(kk, dim=-1).indices
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)


def keep_cett(h: torch.Tensor, norms: torch.Tensor, t: torch.Tensor | float,
              budget: int | None = None) -> torch.Tensor:
    """CETT: a neuron is weak (dropped) when its output norm a_i = fp32(|h_i|) * ||W_down[:, i]|| is <= t
    (NaN kept: `not (a <= t)`), the very test of the threshold search (`DenseLayers.cett`) and of the
    fused kernel (`kernels.cett_mask`), so every path keeps the same neurons and counts.

    The cheaper `|h_i| > t / norms_i` (no fp32 product) differs at exact boundaries, and thresholds
    sit exactly on `a` values (the search's grid starts at min(a)). So the fp32 product is made, but
    `budget` elements of h at a time (64 MB of fp32 on a GPU, cache-sized on a CPU): the temporary
    stays small whatever the batch, at the price of a few launches per layer on this fallback path.
    """
    d_f = h.shape[-1]
    flat = h.reshape(-1, d_f)
    norms = norms.to(device=h.device, dtype=torch.float32)
    t = torch.as_tensor(t, dtype=torch.float32)  # a 0-d tensor keeps its device: no host sync
    if budget is None:
        budget = 1 << 24 if h.is_cuda else 1 << 20
    rows = max(1, budget // max(1, d_f))
    keep = torch.empty(flat.shape, dtype=torch.bool, device=h.device)
    for lo in range(0, flat.shape[0], rows):
        part = keep[lo:lo + rows]
        # bf16 |h| times fp32 norms is computed in fp32: fp32(|h|) * norms, no separate fp32 copy of h
        torch.le(torch.mul(flat[lo:lo + rows].abs(), norms), t, out=part)
        part.logical_not_()
    return keep.view(h.shape)


def keep_cett_authors(h: torch.Tensor, norms: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """The authors' sparse-pass test: neuron i is dropped when |h_i| < t / ||W_down[:, i]||, the quotient
    and the comparison in h's dtype (bf16 on a GPU). It differs from `keep_cett` only where rounding puts
    |h_i| within an ulp of the quotient: the reference search uses it, to be the authors' procedure."""
    limit = torch.as_tensor(t, dtype=torch.float32, device=h.device).to(h.dtype) / norms.to(device=h.device,
                                                                                        dtype=h.dtype)
    return h.abs() >= limit


# --- CETT on one batch's dense intermediates --------------------------------------------------------

@dataclass
class DenseLayers:
    """One batch's dense FFN intermediates for every layer, enough to evaluate CETT at any threshold.

    h: (L, m, d_f) in the model dtype; w: (L, d_h, d_f); norms: (L, d_f) fp32; y_norm: (L, m) fp32 =
    ||W_down h|| per token. a: (L, m, d_f) fp32 neuron output norms |h_i| * ||W_down[:, i]||, kept only
    where the fused Triton probe is not used, so that an unfused probe is a single compare-and-select
    (the reference's own `a <= t` test); the fused probe computes it in registers. Memory is bounded by
    the batch, never by the whole evaluation set.

    Where sparse updates serve (the fused probe, d_h >= UPDATE_MIN_DH), each layer's last masked product
    y (L, m, d_h fp32, allocated on first use) is kept, and a probe near it is a sparse update of it
    (`kernels.cett_update`) rather than a dense product. `sample` (a sorted sample of each layer's a, on
    the CPU; None where updates do not serve) says how much of h lies between two thresholds: the
    update's cost.
    """

    h: torch.Tensor
    a: torch.Tensor | None
    w: torch.Tensor
    norms: torch.Tensor
    y_norm: torch.Tensor
    sample: torch.Tensor | None = None
    dense_probes: int = field(default=0, init=False)  # (layer, threshold) pairs by a dense product ...
    updated_probes: int = field(default=0, init=False)  # ... and by a sparse update
    _y: torch.Tensor | None = field(default=None, init=False, repr=False)
    _y_t: list[float | None] = field(default_factory=list, init=False, repr=False)

    @classmethod
    def build(cls, hs: list[torch.Tensor], w: torch.Tensor, norms: torch.Tensor) -> DenseLayers:
        """hs: each layer's (m, d_f) h; w: (L, d_h, d_f) stacked down projections; norms: (L, d_f)."""
        from sparsinglaw.kernels import cett_probe, cett_update

        h = torch.stack(hs)
        w = w.to(h.dtype)
        norms = norms.float()
        fused = cett_probe.enabled(h)
        a = None if fused else torch.stack([_neuron_norms(hi, ni) for hi, ni in zip(h, norms)])
        y_norm = torch.stack([_rownorm(hi @ wi.t()) for hi, wi in zip(h, w)])
        updates = fused and w.shape[1] >= UPDATE_MIN_DH and cett_update.enabled(h)
        return cls(h=h, a=a, w=w, norms=norms, y_norm=y_norm, sample=_a_sample(h, norms) if updates else None)

    @property
    def n_layers(self) -> int:
        return self.h.shape[0]

    def cett(self, layers: torch.Tensor, t: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        """Mean over tokens of ||sum_{a_i <= t} n_i|| / ||y|| for each (layer, threshold) pair.

        `layers` may repeat a layer (several thresholds of one layer in one batched product).
        """
        if self.a is None:  # the fused Triton probe (sparsinglaw.kernels.cett_probe)
            return self._cett_fused(layers, t)
        m, d_f = self.h.shape[1], self.h.shape[2]
        if budget is None:  # elements of h per chunk: large on a GPU (few launches), cache-sized on a CPU
            budget = 1 << 28 if self.h.is_cuda else 1 << 24
        chunk = max(1, budget // max(1, len(layers) * d_f))
        every = len(layers) == self.n_layers and bool((layers == torch.arange(self.n_layers,
                                                                              device=layers.device)).all())
        w_t = (self.w if every else self.w[layers]).transpose(1, 2)
        t = t.float()[:, None, None]
        total = torch.zeros(len(layers), device=self.h.device, dtype=torch.float32)
        for lo in range(0, m, chunk):
            if every:
                hc, ac = self.h[:, lo:lo + chunk], self.a[:, lo:lo + chunk]
            else:
                hc, ac = self.h[layers, lo:lo + chunk], self.a[layers, lo:lo + chunk]
            weak = torch.where(ac <= t, hc, 0)
            e = _rownorm(torch.bmm(weak, w_t)) / self.y_norm[layers, lo:lo + chunk]
            total += e.sum(dim=1)
        return total / m

    def _cett_fused(self, layers: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The fused probe, each request either a dense product or, near the layer's kept product, a sparse
        update of it. Requests of one layer are served one per round, nearest to the kept product first
        (a search's pair of neighbouring candidates: a dense product, then a one-candidate update)."""
        from sparsinglaw.kernels import cett_probe, cett_update

        if self.sample is None or not self._alloc_y():
            self.dense_probes += len(layers)
            return (cett_probe.weak_norms(self.h, self.norms, self.w, layers, t) / self.y_norm[layers]).mean(1)
        ls, ts = layers.tolist(), t.float().tolist()
        todo: dict[int, list[int]] = {}
        for i, layer in enumerate(ls):
            todo.setdefault(layer, []).append(i)
        dev = self.h.device
        out = torch.empty(len(ls), device=dev, dtype=torch.float32)
        while todo:
            dense, near = [], []
            for layer, idxs in todo.items():
                kept = self._y_t[layer]
                i = idxs.pop(min(range(len(idxs)), key=lambda j: abs(ts[idxs[j]] - kept)) if kept is not None else 0)
                close = kept is not None and self._share(layer, kept, ts[i]) <= UPDATE_SHARE
                (near if close else dense).append(i)
            todo = {layer: idxs for layer, idxs in todo.items() if idxs}
            for reqs, is_near in ((dense, False), (near, True)):
                if not reqs:
                    continue
                lt = torch.tensor([ls[i] for i in reqs], device=dev)
                tt = torch.tensor([ts[i] for i in reqs], device=dev, dtype=torch.float32)
                if is_near:
                    old = torch.tensor([self._y_t[ls[i]] for i in reqs], device=dev, dtype=torch.float32)
                    nr = cett_update.update(self._y, self.h, self.w, lt, old, tt, self.norms)
                    self.updated_probes += len(reqs)
                else:
                    nr = cett_probe.weak_norms(self.h, self.norms, self.w, lt, tt, y=self._y)
                    self.dense_probes += len(reqs)
                out[torch.tensor(reqs, device=dev)] = (nr / self.y_norm[lt]).mean(1)
                for i in reqs:
                    self._y_t[ls[i]] = ts[i]
        return out

    def drop_products(self) -> None:
        """Free the kept products (L x m x d_h fp32, about 0.8 x h's memory): a held batch gives them up
        while other batches stream past it, so that the peak does not grow with the evaluation set. The
        next probe allocates them again."""
        self._y, self._y_t = None, []

    def _alloc_y(self) -> bool:
        """Room for each layer's last product (about 0.8 x h's memory for a 2.5 x wide FFN); without it
        (out of memory), every probe is a dense product."""
        if self._y is None:
            try:
                self._y = torch.empty(*self.h.shape[:2], self.w.shape[1], device=self.h.device, dtype=torch.float32)
            except torch.OutOfMemoryError:
                self.sample = None  # updates off for this batch
                return False
            self._y_t = [None] * self.n_layers
        return True

    def _share(self, layer: int, t1: float, t2: float) -> float:
        """Estimated share of layer's h with a between t1 and t2 (the elements a sparse update touches)."""
        lo, hi = min(t1, t2), max(t1, t2)
        sample = self.sample[layer]
        ends = torch.searchsorted(sample, torch.tensor([lo, hi]), right=True).tolist()
        return (ends[1] - ends[0]) / len(sample)

    def grids(self, ends: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The authors' candidates for every layer at once: 65,536 points from min(a) to the 0.99 quantile
        of a strided subsample of a. Same values as `reference_grid`, but the quantile comes from two
        selections (topk) on a strided view instead of a full sort per layer. `ends`: `grid_ends()`
        computed earlier (its kernels queued; this reads them back)."""
        return _linspaces(*(ends if ends is not None else self.grid_ends()))

    def grid_ends(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(min a, the 0.99 quantile of the strided subsample of a) of every layer, as device tensors: the
        grids' work, with no host sync (the grid itself needs one: torch.linspace takes numbers)."""
        n_layers, m, d_f = self.h.shape
        numel = m * d_f
        stride = grid_stride(numel)
        if self.a is not None:
            sub, low = self.a.reshape(n_layers, numel)[:, ::stride], self.a.amin(dim=(1, 2))
            return low, _quantile99(sub)
        # one layer's a at a time (the fused probe never needs all of it), and only its quantile kept: a
        # strided view would keep each layer's whole fp32 a alive (2x h's memory at the peak)
        qs, lows = [], []
        for hi, ni in zip(self.h, self.norms):
            if stride > 1 and d_f % stride == 0:  # the strided elements are whole columns: a of those only
                sub = _neuron_norms(hi[:, ::stride], ni[::stride]).reshape(1, -1)
                # min a, exactly: x -> fp32(x * norm) is monotone for norm >= 0, so each column's least |h|
                lows.append((hi.abs().amin(dim=0).float() * ni).amin())
            else:
                a = _neuron_norms(hi, ni).reshape(1, numel)
                sub = a[:, ::stride]
                lows.append(a.amin())
                del a
            qs.append(_quantile99(sub))
            del sub
        return torch.stack(lows), torch.cat(qs)


def _quantile99(sub: torch.Tensor) -> torch.Tensor:
    """torch.quantile(sub, 0.99, dim=1), in its arithmetic: the rank 0.99 (n - 1) and its fraction in fp32,
    then torch.lerp between order statistics k and k + 1 (its formula switches at a weight of 0.5), from
    two selections (topk) instead of a full sort. (A selection in a window placed by a random pilot was 2.7x
    quicker on a CPU but slower on an H200, where its two host syncs per layer stall the queue.)"""
    n = sub.shape[1]
    pos = torch.tensor(0.99, dtype=torch.float32) * (n - 1)
    k = min(n - 1, math.floor(pos.item()))
    top = sub.topk(n - k, dim=1, sorted=False).values  # the top 1%: holds order statistics k and k + 1
    two = top.topk(min(2, n - k), dim=1, largest=False).values  # ascending
    q = two[:, 0]
    if n - k > 1:
        q = torch.lerp(q, two[:, 1], (pos - k).to(sub.device))
    return q


def _linspaces(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """torch.linspace(lo[i], hi[i], GRID_POINTS) for every i, built as torch builds one (from both ends)."""
    return torch.stack([torch.linspace(a, b, GRID_POINTS, device=lo.device, dtype=torch.float32)
                        for a, b in zip(lo.tolist(), hi.tolist())])


def _neuron_norms(h: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """a = |h_i| * ||W_down[:, i]|| in fp32: the quantity CETT thresholds."""
    return h.abs().float() * norms


def _a_sample(h: torch.Tensor, norms: torch.Tensor, size: int = SAMPLE_SIZE) -> torch.Tensor:
    """(L, size) sorted fp32 a values of random elements of each layer (a fixed seed), on the CPU."""
    n_layers, m, d_f = h.shape
    gen = torch.Generator(device=h.device).manual_seed(0)
    idx = torch.randint(m * d_f, (size,), device=h.device, generator=gen)
    flat = h.reshape(n_layers, m * d_f)
    return (flat[:, idx].abs().float() * norms[:, idx % d_f]).sort(dim=1).values.cpu()


def _rownorm(x: torch.Tensor) -> torch.Tensor:
    """fp32 row norms, accumulated in fp32 without an fp32 copy of x."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)


def reference_grid(a: torch.Tensor) -> torch.Tensor:
    """The authors' candidates for one layer: 65,536 points from min(a) to the 0.99 quantile of
    `a.view(-1)[::max(numel // 65536, 1)]` (a: the (tokens x d_f) neuron output norms, row-major)."""
    flat = a.flatten()
    hi = torch.quantile(flat[::grid_stride(flat.numel())].float(), 0.99)
    return torch.linspace(flat.min().item(), hi.item(), GRID_POINTS, device=a.device, dtype=torch.float32)


def reference_layer_threshold(h: torch.Tensor, w: torch.Tensor, norms: torch.Tensor, tau: float) -> float:
    """The authors' per-layer search, quirks included (docs/science.md): one masked product and one
    host sync per bisection step; returns the candidate just below the first whose CETT exceeds tau,
    wrapping to the largest candidate when even the smallest exceeds tau; no guard for ||y|| = 0."""
    a = h.abs().float() * norms
    grid = reference_grid(a)
    y_norm = (h @ w.t()).float().norm(dim=-1)
    lo, hi = 0, GRID_POINTS - 1
    while lo < hi:
        mid = (lo + hi) // 2
        weak = h * (a <= grid[mid]).to(h.dtype)
        cett = ((weak @ w.t()).float().norm(dim=-1) / y_norm).mean().item()
        if cett > tau:
            hi = mid
        else:
            lo = mid + 1
    return grid[lo - 1].item()


def _crossing(t1: float, c1: float, t2: float, c2: float, tau: float) -> float | None:
    """Where CETT reaches tau between (t1, c1) and (t2, c2): a power law through both (CETT grows as
    about t^1.1-1.4, so its log-log interpolation has no curvature bias), linear where logs fail."""
    if c2 <= c1 or t2 <= t1 or not (c1 <= tau <= c2):
        return None
    if t1 > 0 and c1 > 0:
        return t1 * math.exp(math.log(t2 / t1) * math.log(tau / c1) / math.log(c2 / c1))
    return t1 + (t2 - t1) * (tau - c1) / (c2 - c1)


class ThresholdSearch:
    """Per-layer CETT thresholds of one batch for any tau, on the authors' candidate grid.

    It returns the reference's candidate (the one just below the first whose CETT exceeds tau) but gets
    there with far fewer masked products: all layers (and, through `thresholds_all`, all batches) are
    searched at once (one host sync per step), CETT evaluations are memoised across taus (a later tau
    starts from the tightest known bracket), and every probe aims at an estimate of the crossing.
    CETT(t) is smooth down to a single candidate and close to a power law, so an estimate from measured
    points or another batch's threshold is good to a few candidates; once it is good to about one, the
    two candidates around it end the search. Typically 2-4 masked products per layer and tau, in as many
    steps (benchmarks/dev/threshold_probes.py), against the reference's 16.

    Differs from the reference in one guard: when even the smallest candidate exceeds tau, the layer
    keeps every contributing neuron (threshold 0) instead of wrapping to the largest candidate.
    """

    def __init__(self, dense: DenseLayers, grid: torch.Tensor | None = None):
        self.dense = dense
        self.grid = dense.grids() if grid is None else grid  # (L, N)
        n = dense.n_layers
        # known (index, CETT) pairs per layer, with virtual end points: CETT 0 below the grid, and the
        # top candidate, which the reference never evaluates, as an upper sentinel
        self.known: list[dict[int, float]] = [{} for _ in range(n)]
        self.evaluations = 0
        ends = self.grid[:, [0, -1]].double().cpu().tolist()  # grid[x] = start + x * step (a linspace)
        self._line = [(a, (b - a) / (GRID_POINTS - 1)) for a, b in ends]
        # the known points in (ln t, ln CETT), where both are positive: where the power laws are fitted
        self._logs: list[dict[int, tuple[float, float]]] = [{} for _ in range(n)]
        # per layer, from the last search given a hint: (tau, this batch's threshold / the hint)
        self._offset: list[tuple[float, float] | None] = [None] * n
        # tau -> (thresholds, each layer's local exponent k in CETT ~ t^k there): another batch's first guess
        self.answers: dict[float, tuple[torch.Tensor, list[float | None]]] = {}

    def _t(self, layer: int, x: float) -> float:
        start, step = self._line[layer]
        return start + x * step

    def _x(self, layer: int, t: float) -> float:
        start, step = self._line[layer]
        return (t - start) / step

    def _bracket(self, layer: int, tau: float) -> tuple[int, float, int, float]:
        lo, c_lo, hi, c_hi = -1, 0.0, GRID_POINTS - 1, 1.0
        for i, c in self.known[layer].items():
            if c > tau:  # a NaN CETT (a token with ||y|| = 0: the reference has no guard) is not above tau
                if i < hi:
                    hi, c_hi = i, c
            elif i > lo:
                lo, c_lo = i, c
        if hi <= lo:  # non-monotone rounding noise: trust the larger index
            hi, c_hi = lo + 1, max(c_lo, tau) + 1e-12
        return lo, c_lo, hi, c_hi

    def _proposal(self, layer: int, lo: int, c_lo: float, hi: int, c_hi: float, tau: float, slow: int,
                  hint: float | None = None, hint_k: float | None = None) -> list[int]:
        """Grid indices to probe next for one layer.

        With an estimate of the crossing good to about a candidate: the candidates either side of it (less
        a known end), which usually end the search. With a rougher one: the estimate itself (the next
        estimate, a power law through it, is then good to a candidate), or, with no exponent known yet,
        two probes about the estimate's spread apart. Without an estimate, or after a step that made no
        progress: interpolation in the bracket, then bisection.
        """
        if hi - lo <= 3:
            return list(range(lo + 1, hi))
        modelled = not slow and self._line[layer][1] > 0 and tau > 0
        guess = self._guess(layer, lo, c_lo, hi, c_hi, tau, hint, hint_k) if modelled else None
        if guess is None:
            frac = (tau - c_lo) / (c_hi - c_lo) if c_hi > c_lo else math.nan
            est = lo + frac * (hi - lo) if math.isfinite(frac) and not slow else (lo + hi) / 2
            return [min(max(round(est), lo + 1), hi - 1)]
        x, sigma, sloped = guess
        if sigma <= CLOSE_SIGMA:
            j = min(max(math.floor(x), lo), hi - 1)
            return [v for v in (j, j + 1) if lo < v < hi]
        if sloped:
            return [min(max(round(x), lo + 1), hi - 1)]
        return sorted({min(max(math.floor(x - sigma), lo + 1), hi - 1), min(max(math.ceil(x + sigma), lo + 1), hi - 1)})

    def _exponent(self, layer: int, x0: int) -> float | None:
        """Local k of CETT ~ t^k: least squares in (ln t, ln CETT) over this batch's points near candidate
        x0; None with fewer than two, 0 where CETT is flat or falls there (no power law to follow)."""
        if self._t(layer, x0) <= 0:
            return None
        u0 = math.log(self._t(layer, x0))
        near = [(u, v) for u, v in self._logs[layer].values() if abs(u - u0) <= FIT_WINDOW]
        if len(near) < 2:
            return None
        um, vm = sum(u for u, _ in near) / len(near), sum(v for _, v in near) / len(near)
        suu = sum((u - um) ** 2 for u, _ in near)
        k = sum((u - um) * (v - vm) for u, v in near) / suu if suu > 0 else 0.0
        return k if k > 0 and math.isfinite(k) else 0.0

    def _guess(self, layer: int, lo: int, c_lo: float, hi: int, c_hi: float, tau: float,
               hint: float | None, hint_k: float | None) -> tuple[float, float, bool] | None:
        """(crossing of tau as a fractional grid index, its uncertainty in candidates, whether an exponent
        is known), from the most certain of: a power law between the bracket's measured ends; one through
        this batch's point nearest tau, with the exponent of its neighbours (else the hint's, else
        DEFAULT_K); and the hint, corrected by this batch's offset from the hint's batch at an earlier tau."""
        out: list[tuple[float, float]] = []
        if lo >= 0 and hi in self.known[layer]:
            t = _crossing(self._t(layer, lo), c_lo, self._t(layer, hi), c_hi, tau)
            if t is not None:
                out.append((self._x(layer, t), INTERP_SIGMA[0] + ((hi - lo) / INTERP_SIGMA[1]) ** 2))
        logs = self._logs[layer]
        if logs:
            lt = math.log(tau)
            x1 = min(reversed(logs), key=lambda x: abs(logs[x][1] - lt))  # ties: the latest probe
            k = self._exponent(layer, x1)
            k = (hint_k or DEFAULT_K) if k is None else k
            if k > 0:
                x = self._x(layer, math.exp(min(logs[x1][0] + (lt - logs[x1][1]) / k, 700.0)))  # (k ~ 0: far)
                out.append((x, EXTRAP_SIGMA[0] + EXTRAP_SIGMA[1] * abs(x - x1)))
        if hint is not None and hint > 0:
            spread, off = HINT_SPREAD, self._offset[layer]
            if off is not None:
                hint *= off[1]
                spread = SHIFT_SPREAD[0] + SHIFT_SPREAD[1] * abs(math.log(tau / off[0]))
            out.append((self._x(layer, hint), spread * hint / self._line[layer][1]))
        # one beyond the bracket puts the crossing at that end (at the top of the grid, when tau is out of reach)
        out = [(min(max(x, lo), hi - 1e-9), sg) for x, sg in out if math.isfinite(x)]
        best = min(out, key=lambda g: g[1], default=None)
        return None if best is None else (*best, bool(logs) or hint_k is not None)

    def thresholds(self, tau: float) -> torch.Tensor:
        """Each layer's threshold at tau (see `thresholds_all` for several batches at once)."""
        return thresholds_all([self], tau)[0]

    def _search(self, tau: float, hint: list[float] | None = None, hint_k: list[float | None] | None = None
                ) -> Generator[tuple[torch.Tensor, torch.Tensor], list[float], torch.Tensor]:
        """The bracketing loop as a generator: yields (layers, thresholds) to evaluate, receives their CETT.
        hint: each layer's threshold at tau on another batch (a first guess); hint_k: that batch's
        exponents there (None where unknown)."""
        n = self.dense.n_layers
        state = [list(self._bracket(layer, tau)) for layer in range(n)]
        slow = [0] * n  # 1: the last step made no progress, so bisect
        span = [math.inf] * n  # how far the last step probed from the bracket's nearer end
        for steps in itertools.count(1):
            active = [layer for layer in range(n) if state[layer][2] - state[layer][0] > 1]
            if not active:
                break
            layers, probes = [], []
            for layer in active:
                for x in self._proposal(layer, *state[layer], tau, slow[layer], hint[layer] if hint else None,
                                        hint_k[layer] if hint_k else None):
                    layers.append(layer)
                    probes.append(x)
            lt = torch.as_tensor(layers, device=self.grid.device)
            vals = yield lt, self.grid[lt, torch.as_tensor(probes, device=self.grid.device)]
            self.evaluations += len(probes)
            before = {layer: (state[layer][2] - state[layer][0], 0) for layer in active}
            for layer, x in zip(layers, probes):
                lo, hi = state[layer][0], state[layer][2]
                before[layer] = (hi - lo, max(before[layer][1], min(x - lo, hi - x)))
            for layer, x, c in zip(layers, probes, vals):
                self.known[layer][x] = c
                if c > 0 and self._t(layer, x) > 0:
                    self._logs[layer][x] = (math.log(self._t(layer, x)), math.log(c))
                lo, c_lo, hi, c_hi = state[layer]
                if c > tau:  # NaN counts as not above tau, as in the reference, so every probe narrows
                    if x < hi:
                        state[layer] = [lo, c_lo, x, c]
                elif x > lo:
                    state[layer] = [x, c, hi, c_hi]
            for layer in active:
                # progress: the bracket halved, or the probes came twice as close to its ends as the last
                # step's (estimates converging from one side, as a power law's curvature makes them)
                width, reach = before[layer]
                ok = 2 * (state[layer][2] - state[layer][0]) <= width or 2 * reach <= span[layer]
                span[layer] = reach
                slow[layer] = int(not ok or steps >= MODEL_STEPS)
        if hint:
            for layer, st in enumerate(state):
                if st[0] >= 0 and hint[layer] > 0:
                    self._offset[layer] = (tau, self._t(layer, st[0]) / hint[layer])
        idx = torch.as_tensor([s[0] for s in state], device=self.grid.device)  # = first exceeding - 1
        t = self.grid.gather(1, idx.clamp(min=0)[:, None])[:, 0]
        # a = 0 neurons contribute nothing, so threshold 0 keeps every neuron that matters
        out = torch.where(idx < 0, torch.zeros_like(t), t)
        self.answers[tau] = (out, [(self._exponent(layer, st[0]) or None) if st[0] >= 0 else None
                                   for layer, st in enumerate(state)])
        return out


def thresholds_all(searches: list[ThresholdSearch], tau: float, hint: ThresholdSearch | None = None
                   ) -> list[torch.Tensor]:
    """Per-layer thresholds of several batches at tau, their searches run in lockstep: every step
    launches all batches' probes and waits once, so a device is never idle between small products.
    hint: another batch's search that has answered tau: its thresholds are a first guess for each layer,
    and its local exponents aim the first probe (a 0.1-5% miss then costs one probe, not two)."""
    known = hint.answers.get(tau) if hint is not None else None
    hl = [float(x) for x in known[0].tolist()] if known is not None else None
    hk = known[1] if known is not None else None
    gens = [s._search(tau, hl, hk) for s in searches]
    results: list[torch.Tensor | None] = [None] * len(gens)
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def advance(i: int, vals: list[float] | None) -> None:
        try:
            pending[i] = next(gens[i]) if vals is None else gens[i].send(vals)
        except StopIteration as stop:
            results[i] = stop.value

    for i in range(len(gens)):
        advance(i, None)
    while pending:
        asked = list(pending.items())
        pending.clear()
        outs = [searches[i].dense.cett(layers, t) for i, (layers, t) in asked]
        flat = torch.cat(outs).tolist()
        pos = 0
        for (i, _), out in zip(asked, outs):
            advance(i, flat[pos:pos + len(out)])
            pos += len(out)
    return results  # type: ignore[return-value]
