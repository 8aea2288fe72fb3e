"""The paper's sparsity metrics as keep-masks, and CETT's threshold search (SPEC section 2).

Conventions: h is the input of the down projection (m tokens x d_f), s the activation output,
`norms` the fp32 column norms of W_down, so neuron i's output norm is a_i = |h_i| * norms_i.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass

import torch

GRID_POINTS = 65536  # the authors' candidate count per layer
HINT_SPREAD = 0.005  # another batch's threshold is probed at +-0.5%: batches of one layer differ by about that
QUANTILE_MAX = 2**24  # torch.quantile's input limit: the authors subsample with a stride to fit it


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


# --- CETT on one batch's dense intermediates --------------------------------------------------------

@dataclass
class DenseLayers:
    """One batch's dense FFN intermediates for every layer, enough to evaluate CETT at any threshold.

    h: (L, m, d_f) in the model dtype; w: (L, d_h, d_f); norms: (L, d_f) fp32; y_norm: (L, m) fp32 =
    ||W_down h|| per token. a: (L, m, d_f) fp32 neuron output norms |h_i| * ||W_down[:, i]||, kept only
    where the fused Triton probe is not used, so that an unfused probe is a single compare-and-select
    (the reference's own `a <= t` test); the fused probe computes it in registers. Memory is bounded by
    the batch, never by the whole evaluation set.
    """

    h: torch.Tensor
    a: torch.Tensor | None
    w: torch.Tensor
    norms: torch.Tensor
    y_norm: torch.Tensor

    @classmethod
    def build(cls, hs: list[torch.Tensor], w: torch.Tensor, norms: torch.Tensor) -> DenseLayers:
        """hs: each layer's (m, d_f) h; w: (L, d_h, d_f) stacked down projections; norms: (L, d_f)."""
        from sparsinglaw.kernels import cett_probe

        h = torch.stack(hs)
        w = w.to(h.dtype)
        norms = norms.float()
        a = None if cett_probe.enabled(h) else torch.stack([_neuron_norms(hi, ni) for hi, ni in zip(h, norms)])
        y_norm = torch.stack([_rownorm(hi @ wi.t()) for hi, wi in zip(h, w)])
        return cls(h=h, a=a, w=w, norms=norms, y_norm=y_norm)

    @property
    def n_layers(self) -> int:
        return self.h.shape[0]

    def cett(self, layers: torch.Tensor, t: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        """Mean over tokens of ||sum_{a_i <= t} n_i|| / ||y|| for each (layer, threshold) pair.

        `layers` may repeat a layer (several thresholds of one layer in one batched product).
        """
        if self.a is None:  # the fused Triton probe (sparsinglaw.kernels.cett_probe)
            from sparsinglaw.kernels import cett_probe

            return (cett_probe.weak_norms(self.h, self.norms, self.w, layers, t) / self.y_norm[layers]).mean(1)
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

    def grids(self) -> torch.Tensor:
        """The authors' candidates for every layer at once: 65,536 points from min(a) to the 0.99 quantile
        of a strided subsample of a. Same values as `reference_grid`, but the quantile comes from two
        selections (topk) on a strided view instead of a full sort per layer."""
        n_layers, m, d_f = self.h.shape
        numel = m * d_f
        stride = max(1, math.ceil(numel / QUANTILE_MAX))
        if self.a is not None:
            sub, low = self.a.reshape(n_layers, numel)[:, ::stride], self.a.amin(dim=(1, 2))
        else:  # one layer's a at a time: the fused probe never needs all of it
            subs, lows = [], []
            for hi, ni in zip(self.h, self.norms):
                a = _neuron_norms(hi, ni).reshape(numel)
                subs.append(a[::stride])
                lows.append(a.amin())
            sub, low = torch.stack(subs), torch.stack(lows)
        n = sub.shape[1]
        pos = 0.99 * (n - 1)  # torch.quantile's linear interpolation between order statistics k and k + 1
        k = math.floor(pos)
        top = sub.topk(n - k, dim=1, sorted=False).values  # the top 1%: holds order statistics k and k + 1
        two = top.topk(min(2, n - k), dim=1, largest=False).values  # ascending
        q = two[:, 0]
        if pos > k and n - k > 1:
            q = q + (pos - k) * (two[:, 1] - q)
        return _linspaces(low, q)


def _linspaces(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """torch.linspace(lo[i], hi[i], GRID_POINTS) for every i, built as torch builds one (from both ends)."""
    return torch.stack([torch.linspace(a, b, GRID_POINTS, device=lo.device, dtype=torch.float32)
                        for a, b in zip(lo.tolist(), hi.tolist())])


def _neuron_norms(h: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """a = |h_i| * ||W_down[:, i]|| in fp32: the quantity CETT thresholds."""
    return h.abs().float() * norms


def _rownorm(x: torch.Tensor) -> torch.Tensor:
    """fp32 row norms, accumulated in fp32 without an fp32 copy of x."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)


def reference_grid(a: torch.Tensor) -> torch.Tensor:
    flat = a.flatten()
    stride = max(1, math.ceil(flat.numel() / QUANTILE_MAX))
    hi = torch.quantile(flat[::stride].float(), 0.99)
    return torch.linspace(flat.min().item(), hi.item(), GRID_POINTS, device=a.device, dtype=torch.float32)


def reference_layer_threshold(h: torch.Tensor, w: torch.Tensor, norms: torch.Tensor, tau: float) -> float:
    """The authors' per-layer search, quirks included (SPEC section 2): one masked product and one
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


class ThresholdSearch:
    """Per-layer CETT thresholds of one batch for any tau, on the authors' candidate grid.

    It returns the reference's candidate (the one just below the first whose CETT exceeds tau) but gets
    there with far fewer masked products: all layers (and, through `thresholds_all`, all batches) are
    searched at once (one host sync per step), CETT evaluations are memoised across taus (a later tau
    starts from the tightest known bracket), and the next probe comes from a power law through the
    measured points nearest tau, two candidates at once when the estimate is close (safeguarded by
    interpolation and bisection when a step fails to halve the bracket) instead of always bisecting.

    Differs from the reference in one guard: when even the smallest candidate exceeds tau, the layer
    keeps every contributing neuron (threshold 0) instead of wrapping to the largest candidate.
    """

    pair_delta = 2.0  # probe two candidates at once when the estimate is this close (in candidates)

    def __init__(self, dense: DenseLayers):
        self.dense = dense
        self.grid = dense.grids()  # (L, N)
        n = dense.n_layers
        # known (index, CETT) pairs per layer, with virtual end points: CETT 0 below the grid, and the
        # top candidate, which the reference never evaluates, as an upper sentinel
        self.known: list[dict[int, float]] = [{} for _ in range(n)]
        self.evaluations = 0
        ends = self.grid[:, [0, -1]].double().cpu().tolist()  # grid[x] = start + x * step (a linspace)
        self._line = [(a, (b - a) / (GRID_POINTS - 1)) for a, b in ends]

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
                  hint: float | None = None) -> list[int]:
        """Grid indices to probe next for one layer: one, or two around a trusted estimate.

        With two measured points, CETT is modelled as a power of the threshold through the measured points
        nearest tau (one each side when known); that lands within a few candidates of the answer, so two
        probes around the estimate usually close the bracket in one step. Otherwise (or after a probe
        that failed to halve the bracket) it falls back to interpolation in the bracket, then bisection.
        """
        if hi - lo <= 3:
            return list(range(lo + 1, hi))
        start, step = self._line[layer]
        if hint is not None and step > 0 and not slow:
            # another batch's threshold at this tau: a better first guess than extrapolating this batch's
            # own points, unless one of them already has a CETT within 5% of tau
            near = min((abs(math.log(c / tau)) for c in self.known[layer].values() if c > 0), default=math.inf)
            x = (hint - start) / step
            if near > 0.05 and lo < x < hi:
                d = max(1.0, HINT_SPREAD * hint / step)
                return sorted({min(max(math.floor(x - d), lo + 1), hi - 1), min(max(math.ceil(x + d), lo + 1), hi - 1)})
        real = [(x, c) for x, c in self.known[layer].items() if c > 0 and start + x * step > 0]
        est = None
        if len(real) >= 2 and not slow:
            below = [pt for pt in real if pt[1] <= tau]
            above = [pt for pt in real if pt[1] > tau]
            if below and above:
                (x1, c1), (x2, c2) = max(below, key=lambda q: q[1]), min(above, key=lambda q: q[1])
            else:
                (x1, c1), (x2, c2) = sorted(real, key=lambda q: abs(math.log(q[1] / tau)))[:2]
            t1, t2 = start + x1 * step, start + x2 * step
            if t1 != t2 and c1 != c2:
                k = (math.log(c2) - math.log(c1)) / (math.log(t2) - math.log(t1))
                if k > 0:
                    t = t1 * math.exp((math.log(tau) - math.log(c1)) / k)
                    est = (t - start) / step if step > 0 else None
        if est is None or not math.isfinite(est):
            frac = (tau - c_lo) / (c_hi - c_lo) if c_hi > c_lo else math.nan
            est = lo + frac * (hi - lo) if math.isfinite(frac) and not slow else (lo + hi) / 2
            return [min(max(round(est), lo + 1), hi - 1)]
        est = min(max(est, lo + 1), hi - 1)
        delta = max(0.5, 0.02 * min(abs(est - x) for x, _ in real))
        if 4 * delta >= hi - lo or delta > self.pair_delta:
            return [min(max(round(est), lo + 1), hi - 1)]
        pair = {min(max(math.floor(est - delta + 1), lo + 1), hi - 1),
                min(max(math.floor(est + delta), lo + 1), hi - 1)}
        return sorted(pair)

    def thresholds(self, tau: float) -> torch.Tensor:
        """Each layer's threshold at tau (see `thresholds_all` for several batches at once)."""
        return thresholds_all([self], tau)[0]

    def _search(self, tau: float, hint: list[float] | None = None
                ) -> Generator[tuple[torch.Tensor, torch.Tensor], list[float], torch.Tensor]:
        """The bracketing loop as a generator: yields (layers, thresholds) to evaluate, receives their CETT.
        hint: each layer's threshold at tau on another batch (a first guess)."""
        n = self.dense.n_layers
        state = [list(self._bracket(layer, tau)) for layer in range(n)]
        slow = [0] * n  # consecutive steps that did not halve the bracket
        while True:
            active = [layer for layer in range(n) if state[layer][2] - state[layer][0] > 1]
            if not active:
                break
            layers, probes = [], []
            for layer in active:
                for x in self._proposal(layer, *state[layer], tau, slow[layer], hint[layer] if hint else None):
                    layers.append(layer)
                    probes.append(x)
            lt = torch.as_tensor(layers, device=self.grid.device)
            vals = yield lt, self.grid[lt, torch.as_tensor(probes, device=self.grid.device)]
            self.evaluations += len(probes)
            widths = {layer: state[layer][2] - state[layer][0] for layer in active}
            for layer, x, c in zip(layers, probes, vals):
                self.known[layer][x] = c
                lo, c_lo, hi, c_hi = state[layer]
                if c > tau:  # NaN counts as not above tau, as in the reference, so every probe narrows
                    if x < hi:
                        state[layer] = [lo, c_lo, x, c]
                elif x > lo:
                    state[layer] = [x, c, hi, c_hi]
            for layer in active:
                slow[layer] = slow[layer] + 1 if 2 * (state[layer][2] - state[layer][0]) > widths[layer] else 0
        idx = torch.as_tensor([s[0] for s in state], device=self.grid.device)  # = first exceeding - 1
        t = self.grid.gather(1, idx.clamp(min=0)[:, None])[:, 0]
        # a = 0 neurons contribute nothing, so threshold 0 keeps every neuron that matters
        return torch.where(idx < 0, torch.zeros_like(t), t)


def thresholds_all(searches: list[ThresholdSearch], tau: float, hint: torch.Tensor | None = None
                   ) -> list[torch.Tensor]:
    """Per-layer thresholds of several batches at tau, their searches run in lockstep: every step
    launches all batches' probes and waits once, so a device is never idle between small products.
    hint: (L,) thresholds at tau of another batch, a first guess for each layer."""
    hl = [float(x) for x in hint.tolist()] if hint is not None else None
    gens = [s._search(tau, hl) for s in searches]
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
