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


def keep_cett(h: torch.Tensor, norms: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """CETT: a neuron is weak (dropped) when its output norm |h_i| * ||W_down[:, i]|| is <= t.

    Tested as |h_i| > t / ||W_down[:, i]|| (fp32 per-neuron cuts), so no fp32 copy of h is made."""
    return h.abs() > t / norms


# --- CETT on one batch's dense intermediates --------------------------------------------------------

@dataclass
class DenseLayers:
    """One batch's dense FFN intermediates for every layer, enough to evaluate CETT at any threshold.

    h: (L, m, d_f) in the model dtype; a: (L, m, d_f) fp32 neuron output norms |h_i| * ||W_down[:, i]||,
    computed once so that a probe is a single compare-and-select (the reference's own `a <= t` test);
    w: (L, d_h, d_f); norms: (L, d_f) fp32; y_norm: (L, m) fp32 = ||W_down h|| per token. Memory is
    bounded by the batch, never by the whole evaluation set.
    """

    h: torch.Tensor
    a: torch.Tensor
    w: torch.Tensor
    norms: torch.Tensor
    y_norm: torch.Tensor

    @classmethod
    def build(cls, hs: list[torch.Tensor], w: torch.Tensor, norms: torch.Tensor) -> DenseLayers:
        """hs: each layer's (m, d_f) h; w: (L, d_h, d_f) stacked down projections; norms: (L, d_f)."""
        h = torch.stack(hs)
        w = w.to(h.dtype)
        norms = norms.float()
        a = torch.stack([hi.abs().float() * ni for hi, ni in zip(h, norms)])
        y_norm = torch.stack([_rownorm(hi @ wi.t()) for hi, wi in zip(h, w)])
        return cls(h=h, a=a, w=w, norms=norms, y_norm=y_norm)

    @property
    def n_layers(self) -> int:
        return self.h.shape[0]

    def cett(self, layers: torch.Tensor, t: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        """Mean over tokens of ||sum_{a_i <= t} n_i|| / ||y|| for each (layer, threshold) pair.

        `layers` may repeat a layer (several thresholds of one layer in one batched product).
        """
        from sparsinglaw.kernels import cett_probe

        if cett_probe.enabled(self.h):  # opt-in fused kernel (SPARSINGLAW_FUSED_PROBE=1)
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
        sub = self.a.reshape(n_layers, numel)[:, ::stride]
        n = sub.shape[1]
        pos = 0.99 * (n - 1)  # torch.quantile's linear interpolation between order statistics k and k + 1
        k = math.floor(pos)
        top = sub.topk(n - k, dim=1, sorted=False).values  # the top 1%: holds order statistics k and k + 1
        two = top.topk(min(2, n - k), dim=1, largest=False).values  # ascending
        q = two[:, 0]
        if pos > k and n - k > 1:
            q = q + (pos - k) * (two[:, 1] - q)
        return _linspaces(self.a.amin(dim=(1, 2)), q)


def _linspaces(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """torch.linspace(lo[i], hi[i], GRID_POINTS) for every i, built as torch builds one (from both ends)."""
    return torch.stack([torch.linspace(a, b, GRID_POINTS, device=lo.device, dtype=torch.float32)
                        for a, b in zip(lo.tolist(), hi.tolist())])


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

    def _proposal(self, layer: int, lo: int, c_lo: float, hi: int, c_hi: float, tau: float, slow: int) -> list[int]:
        """Grid indices to probe next for one layer: one, or two around a trusted estimate.

        With two measured points, CETT is modelled as a power of the threshold through the measured points
        nearest tau (one each side when known); that lands within a few candidates of the answer, so two
        probes around the estimate usually close the bracket in one step. Otherwise (or after a probe
        that failed to halve the bracket) it falls back to interpolation in the bracket, then bisection.
        """
        if hi - lo <= 3:
            return list(range(lo + 1, hi))
        start, step = self._line[layer]
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

    def _search(self, tau: float) -> Generator[tuple[torch.Tensor, torch.Tensor], list[float], torch.Tensor]:
        """The bracketing loop as a generator: yields (layers, thresholds) to evaluate, receives their CETT."""
        n = self.dense.n_layers
        state = [list(self._bracket(layer, tau)) for layer in range(n)]
        slow = [0] * n  # consecutive steps that did not halve the bracket
        while True:
            active = [layer for layer in range(n) if state[layer][2] - state[layer][0] > 1]
            if not active:
                break
            layers, probes = [], []
            for layer in active:
                for x in self._proposal(layer, *state[layer], tau, slow[layer]):
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


def thresholds_all(searches: list[ThresholdSearch], tau: float) -> list[torch.Tensor]:
    """Per-layer thresholds of several batches at tau, their searches run in lockstep: every step
    launches all batches' probes and waits once, so a device is never idle between small products."""
    gens = [s._search(tau) for s in searches]
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
