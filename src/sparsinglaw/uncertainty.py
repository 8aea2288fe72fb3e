"""How sure a CETT-PPL-p% answer is.

F, the PPL ratio, is measured on a finite sample: at a fixed tau it carries sampling noise, and as tau
varies it is a noisy step function that can cross the target several times. So an answer is given as
- the noise of F at each evaluated tau: a bootstrap over blocks of BLOCK_TOKENS consecutive predicted
  tokens (resampled within each batch, then the authors' aggregation: the mean over batches of
  exp(mean Δloss)), the same resamples at every tau;
- a headline that does not depend on the search path: where a monotone (isotonic, weighted by 1/σ²) fit
  of F against ln tau over every evaluation crosses the target, the activation ratio interpolated in
  ln tau there;
- the band of tau (and of activation ratio) whose F is consistent with the target: |F_fit - target| <=
  z σ at the given level, on the fit between evaluations and beyond them on the power law ln ln F = a +
  k ln tau (its noise growing with ln F), marked `extrapolated` then.
The band narrows as 1/sqrt(tokens); `tokens_for` says how many would bring it to a width.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.stats import norm

from sparsinglaw.solver import PRIOR_K, TAU_MIN

if TYPE_CHECKING:
    from sparsinglaw.search import Evaluation

NARROW = 0.01  # a band of activation ratio wider than this is called out
GRID = 8001  # points in ln tau over [ln TAU_MIN, 0] where the band is traced


@dataclass(frozen=True)
class Noise:
    """How the noise of F is estimated and the band drawn: its level, bootstrap resamples and seed."""

    level: float = 0.95
    resamples: int = 1000
    seed: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def f_resamples(ev: Evaluation, noise: Noise | None = None) -> np.ndarray | None:
    """Bootstrap replicates of F (resamples,): each batch's blocks resampled with replacement, F = mean
    over batches of exp(Δloss summed over the drawn blocks / their tokens). None without block losses."""
    noise = noise or Noise()
    if not ev.blocks:
        return None
    rng = np.random.default_rng(noise.seed)
    out = np.zeros(noise.resamples)
    for d, c in ev.blocks:
        d, c = np.asarray(d, dtype=np.float64), np.asarray(c, dtype=np.float64)
        idx = rng.integers(0, len(d), size=(noise.resamples, len(d)))
        out += np.exp(d[idx].sum(1) / c[idx].sum(1))
    return out / len(ev.blocks)


def f_sigma(ev: Evaluation, noise: Noise | None = None) -> float | None:
    """The bootstrap standard deviation of F (None without block losses)."""
    reps = f_resamples(ev, noise)
    return None if reps is None else float(reps.std(ddof=1))


def isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence nearest y in weighted least squares (pool adjacent violators)."""
    vals, wts, sizes = [], [], []
    for yi, wi in zip(np.asarray(y, dtype=np.float64), np.asarray(w, dtype=np.float64)):
        vals.append(yi)
        wts.append(wi)
        sizes.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            wsum = wts[-2] + wts[-1]
            v = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / wsum
            vals[-2:], wts[-2:], sizes[-2:] = [v], [wsum], [sizes[-2] + sizes[-1]]
    return np.repeat(vals, sizes)


@dataclass
class Band:
    """The headline (crossing of the monotone fit) and the band consistent with the target."""

    tau: float
    activation_ratio: float
    tau_interval: tuple[float, float]
    activation_ratio_interval: tuple[float, float]
    ppl_ratio_sigma: float  # noise of F (one standard deviation) at the crossing
    level: float
    tokens: int  # tokens F was measured on
    evaluations: int  # evaluations the fit used
    extrapolated: bool  # the band or the crossing reaches beyond the evaluated taus (on the power law)
    unbounded: bool  # the band reaches tau = 1e-7 or 1: F is consistent with the target that far

    @property
    def width(self) -> float:
        return self.activation_ratio_interval[1] - self.activation_ratio_interval[0]

    def tokens_for(self, width: float = NARROW) -> int:
        """Tokens that would narrow the activation ratio band to `width` (noise falls as 1/sqrt(tokens))."""
        return math.ceil(self.tokens * (self.width / width) ** 2)

    def to_json(self) -> dict:
        out = asdict(self)
        out["width"] = self.width
        out["tokens_for_width_0.01"] = self.tokens_for() if self.width > NARROW else None
        return out

    def describe(self) -> str:
        lo, hi = self.activation_ratio_interval
        return "\n".join([f"activation ratio {self.activation_ratio:.4f} [{lo:.4f}, {hi:.4f}] at tau {self.tau:.5f} "
                          f"[{self.tau_interval[0]:.5f}, {self.tau_interval[1]:.5f}]", *self.notes()])

    def notes(self) -> list[str]:
        """The band's level and noise, and what to know about it: too wide, extrapolated, unbounded."""
        out = [f"{100 * self.level:g}% band: PPL ratio consistent with the target (its noise "
               f"{self.ppl_ratio_sigma:.1e}, from {self.tokens:,} tokens)"]
        if self.width > NARROW:
            out.append(f"the band is {self.width:.3f} wide, more than {NARROW}: about {self.tokens_for():,} tokens "
                       f"would narrow it to {NARROW}")
        if self.extrapolated:
            out.append("part of the band lies beyond the evaluated taus (on the power-law trend of the PPL ratio)")
        if self.unbounded:
            out.append("the band reaches the end of the tau range: the PPL ratio is consistent with the target there")
        return out


def _slope(u: np.ndarray, v: np.ndarray) -> float | None:
    """Least-squares slope of v on u (None without two distinct u)."""
    if len(u) < 2 or np.ptp(u) <= 0:
        return None
    uc = u - u.mean()
    return float((uc * (v - v.mean())).sum() / (uc * uc).sum())


def band(evaluations: list[Evaluation], target: float, noise: Noise | None = None,
         shape: list[Evaluation] | None = None) -> Band | None:
    """The crossing and band from `evaluations` (None when none has block losses). `shape`: other
    evaluations (e.g. on a calibration subset) whose slopes in ln tau, of ln ln F and of the activation
    ratio, extend the fit beyond the evaluated taus where `evaluations` alone span too little."""
    noise = noise or Noise()
    by_tau = {ev.tau: ev for ev in evaluations if ev.blocks and ev.tau > 0 and math.isfinite(ev.tau)}
    pts = [by_tau[t] for t in sorted(by_tau)]
    if not pts:
        return None
    u = np.log([ev.tau for ev in pts])
    f = np.array([ev.ppl_ratio for ev in pts])
    a = np.array([ev.activation_ratio for ev in pts])
    sig = np.array([f_sigma(ev, noise) for ev in pts])
    sig = np.maximum(sig, 1e-12)
    fit = isotonic(f, 1 / sig**2)
    k, sa = _shape_slopes(shape if shape else pts, fit if not shape else None)

    def f_at(x: np.ndarray) -> np.ndarray:
        out = np.interp(x, u, fit)
        for end, side in ((0, x < u[0]), (-1, x > u[-1])):
            if fit[end] > 1:  # beyond the evaluations: on the power law through the end point
                y = math.log(math.log(fit[end])) + k * (x[side] - u[end])
                out[side] = np.exp(np.exp(np.minimum(y, 5.0)))
        return out

    def sig_at(x: np.ndarray, fx: np.ndarray) -> np.ndarray:
        out = np.interp(x, u, sig)
        for end, side in ((0, x < u[0]), (-1, x > u[-1])):
            if fit[end] > 1:  # the noise of F grows with the loss change
                out[side] = sig[end] * np.log(np.maximum(fx[side], 1.0 + 1e-12)) / math.log(fit[end])
        return out

    def a_at(x: np.ndarray) -> np.ndarray:
        out = np.interp(x, u, a)
        if sa is not None:
            out = np.where(x < u[0], a[0] + sa * (x - u[0]), out)
            out = np.where(x > u[-1], a[-1] + sa * (x - u[-1]), out)
        return np.clip(out, 0.0, 1.0)

    z = float(norm.ppf(0.5 + noise.level / 2))
    xs = np.union1d(np.linspace(math.log(TAU_MIN), 0.0, GRID), u)
    fx = f_at(xs)
    ok = np.abs(fx - target) <= z * sig_at(xs, fx)
    above = np.nonzero(fx >= target)[0]
    if len(above) == 0:
        xc = xs[-1]
    elif above[0] == 0:
        xc = xs[0]
    else:  # linear between the grid points either side of the crossing
        i = above[0]
        xc = xs[i - 1] + (target - fx[i - 1]) / (fx[i] - fx[i - 1]) * (xs[i] - xs[i - 1])
    ok_x = xs[ok] if ok.any() else np.array([xc])
    lo_x, hi_x = float(min(ok_x.min(), xc)), float(max(ok_x.max(), xc))
    a_band = a_at(xs[(xs >= lo_x) & (xs <= hi_x)])
    xcv = np.array([xc])
    fc = f_at(xcv)
    return Band(tau=math.exp(xc), activation_ratio=float(a_at(xcv)[0]),
                tau_interval=(math.exp(lo_x), math.exp(hi_x)),
                activation_ratio_interval=(float(a_band.min()), float(a_band.max())),
                ppl_ratio_sigma=float(sig_at(xcv, fc)[0]), level=noise.level, tokens=int(pts[-1].tokens),
                evaluations=len(pts), extrapolated=bool(lo_x < u[0] or hi_x > u[-1]),
                unbounded=bool(lo_x <= xs[0] or hi_x >= xs[-1]))


def _shape_slopes(evs: list[Evaluation], fit: np.ndarray | None) -> tuple[float, float | None]:
    """(k, dA/d ln tau): the slope of ln ln F (fitted values where given, else measured; points with
    F > 1 only; PRIOR_K without two of them, clamped to [0.5, 10] as the solver does) and of the
    activation ratio, against ln tau."""
    u = np.log([ev.tau for ev in evs])
    f = fit if fit is not None else np.array([ev.ppl_ratio for ev in evs])
    up = f > 1
    k = _slope(u[up], np.log(np.log(f[up]))) if up.sum() >= 2 else None
    k = PRIOR_K if k is None or not math.isfinite(k) else min(10.0, max(0.5, k))
    return k, _slope(u, np.array([ev.activation_ratio for ev in evs]))


def a_per_f(evaluations: list[Evaluation], target: float) -> float | None:
    """d(activation ratio) / d(PPL ratio) where F reaches `target`, from the evaluations' slopes in ln tau:
    (dA / d ln tau) / (k target ln target), with ln ln F = a + k ln tau. None with fewer than two."""
    evs = [ev for ev in evaluations if ev.tau > 0]
    if len({ev.tau for ev in evs}) < 2:
        return None
    k, sa = _shape_slopes(evs, None)
    return None if sa is None else sa / (k * target * math.log(target))
