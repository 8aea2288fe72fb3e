"""The tau solver of CETT-PPL-p%: find tau at which the PPL ratio F equals a target, in few evaluations.

ln F rises with tau roughly as a power law, so y = ln ln F is nearly a line in x = ln tau (slope k,
0.9-4.6 on trained models). Until the target is bracketed, every step aims at the crossing of that line,
its slope fitted to all evaluations (pulled towards PRIOR_K when they span little of x) and placed through
those nearest the target, at most x10 per step. Inside a bracket it follows the chord between the
bracket's ends (the line bends, so a global slope creeps in from one side), and bisection takes over
when a side stalls.

F measured on a finite sample is a noisy step function of tau (about 1e-4 on 64K tokens of a 0.1B model),
so chasing it closer than its noise only moves the answer along the noise. `Acceptance` says when an
evaluation is the answer; it is recorded in every result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

PRIOR_K = 1.5  # the slope of ln ln F against ln tau assumed before evaluations span enough of tau
PRIOR_WEIGHT = 0.004  # weight of PRIOR_K in the trend fit, in units of sum (ln tau - mean)^2
TAU_MIN = 1e-7  # the smallest tau tried


@dataclass(frozen=True)
class Point:
    """One evaluation as the solver sees it: F at tau, and where known the activation ratio and the
    number of tokens F was measured on."""

    tau: float
    ppl_ratio: float
    activation_ratio: float | None = None
    tokens: int | None = None


@dataclass(frozen=True)
class Acceptance:
    """When an evaluation is the answer. With e = |F / target - 1| and w = min(max(1, sqrt(loose_tokens /
    tokens)), loose_max / loose) (the noise of F grows as 1/sqrt(tokens) on smaller samples):

    - accepted if e <= loose * w and |A - A*| <= atol * w, where A* is the activation ratio (interpolated
      in ln tau between evaluations: smooth where F is not) at which F crosses the target (on the chord
      across the bracket, or the trend). Where F is flat in tau, `loose` of F alone can be 0.005 of A.
    - judged by F alone (atol None, no activation ratio, or a single evaluation): e <= ftol, or
      e <= loose * w from the third evaluation on.
    - once the bracket is narrower than xtol (relative, in tau): the evaluation nearest the target if
      e <= accept.
    """

    ftol: float = 1e-4  # always accepted
    loose: float = 3e-4  # a little over twice the noise of F on loose_tokens tokens
    atol: float | None = 1e-3  # activation ratio from where F crosses the target; None: judge by F alone
    loose_tokens: int = 65536  # the sample size `loose` was measured on
    loose_max: float = 5e-4  # `loose` widened on smaller samples up to this
    xtol: float = 1e-3
    accept: float = 1e-3

    def widen(self, tokens: int | None) -> float:
        """The factor w above (1 where the token count is unknown)."""
        scale = math.sqrt(max(1.0, self.loose_tokens / tokens)) if tokens else 1.0
        return max(1.0, min(self.loose_max / self.loose, scale)) if self.loose > 0 else 1.0

    def to_json(self) -> dict:
        return asdict(self)


# status codes of SolveResult (success: 0 and 1)
CONVERGED, BRACKET_CLOSED, OUT_OF_REACH_HIGH, OUT_OF_REACH_LOW, MAX_EVALS, NOT_CLOSE = range(6)


@dataclass
class SolveResult(Generic[T]):
    """The solver's answer, scipy-style: `status` (a code above), `success`, `message`; `evaluation` is
    what `evaluate` returned for the answer, `points` every evaluation in order."""

    evaluation: T
    point: Point
    status: int
    message: str
    points: list[Point] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return self.status in (CONVERGED, BRACKET_CLOSED)

    @property
    def tau(self) -> float:
        return self.point.tau


def _as_point(ev: object) -> Point:
    return ev if isinstance(ev, Point) else ev.point  # type: ignore[attr-defined]


class TauSolver:
    """Solves F(tau) = target for one `evaluate`; `solve` may be called once per instance."""

    def __init__(self, target: float, acceptance: Acceptance | None = None, tau0: float = 0.1,
                 max_evals: int = 40):
        self.target, self.acc, self.tau0, self.max_evals = target, acceptance or Acceptance(), tau0, max_evals
        self.lt = math.log(target)
        self.yt = math.log(self.lt)
        self.points: list[Point] = []

    # --- what the evaluations say -------------------------------------------------------------------

    def _g(self, p: Point) -> float:
        return math.log(p.ppl_ratio) - self.lt

    def _y(self, p: Point) -> float:
        return math.log(math.log(p.ppl_ratio))

    def _err(self, p: Point) -> float:
        return abs(p.ppl_ratio / self.target - 1)

    def _near(self, p: Point) -> bool:
        """F within `loose` of the target (widened on fewer tokens)."""
        return self._err(p) <= self.acc.loose * self.acc.widen(p.tokens)

    def _done(self, p: Point) -> bool:
        off = self._a_off(p) if self.acc.atol is not None else None
        if off is None:  # asked to, no activation ratios to judge by, or one evaluation: by F alone
            return self._err(p) <= self.acc.ftol or (self._near(p) and len(self.points) >= 3)
        return self._near(p) and off <= self.acc.atol * self.acc.widen(p.tokens)

    def _a_off(self, p: Point) -> float | None:
        """|activation ratio - its value where F crosses the target|, from the activation ratios measured
        so far (smooth in ln tau, unlike F); None without two evaluations that have one."""
        full = sorted((e for e in self.points if e.activation_ratio is not None), key=lambda e: e.tau)
        x = self._crossing()
        if len(full) < 2 or x is None or p.activation_ratio is None:
            return None
        xs = [math.log(e.tau) for e in full]
        i = min(max(1, sum(v < x for v in xs)), len(xs) - 1)  # interpolate between, or extend the two nearest
        w = (x - xs[i - 1]) / (xs[i] - xs[i - 1]) if xs[i] > xs[i - 1] else 0.0
        a = full[i - 1].activation_ratio + w * (full[i].activation_ratio - full[i - 1].activation_ratio)
        return abs(p.activation_ratio - a)

    def _chord(self, lo: Point | None, hi: Point | None) -> float | None:
        """ln tau where the chord across the bracket (lo, hi) reaches the target; None without a usable
        one. ln ln F bends (its local slope varied 2x across brackets on a 0.1B model), and a line with one
        global slope then creeps in from one side."""
        if lo is None or hi is None or math.log(lo.ppl_ratio) <= 1e-9 or self._y(hi) <= self._y(lo):
            return None
        xa, xb = math.log(lo.tau), math.log(hi.tau)
        return xa + (self.yt - self._y(lo)) / (self._y(hi) - self._y(lo)) * (xb - xa)

    def _crossing(self) -> float | None:
        """ln tau where F crosses the target: on the chord across the bracket when there is one, else on
        the trend."""
        x = self._chord(*self._bracket())
        return x if x is not None else self._trend()

    def _bracket(self) -> tuple[Point | None, Point | None]:
        """The tightest (below, above) pair, never inverted by noise."""
        lo = hi = None
        for e in self.points:
            if self._g(e) < 0 and (lo is None or e.tau > lo.tau) and (hi is None or e.tau < hi.tau):
                lo = e
            elif self._g(e) >= 0 and (hi is None or e.tau < hi.tau) and (lo is None or e.tau > lo.tau):
                hi = e
        return lo, hi

    def _trend(self) -> float | None:
        """ln tau where the fitted line y = a + k x reaches the target (None: no point with ln F > 0)."""
        pts = [(math.log(e.tau), self._y(e)) for e in self.points if math.log(e.ppl_ratio) > 1e-9]
        if not pts:
            return None
        # the line passes through the points nearest the target (weights fall with |y - yt|) ...
        wts = [1.0 / (abs(yy - self.yt) + 0.02) for _, yy in pts]
        sw = sum(wts)
        xm = sum(w * xx for w, (xx, _) in zip(wts, pts)) / sw
        ym = sum(w * yy for w, (_, yy) in zip(wts, pts)) / sw
        # ... with a slope fitted to all of them, pulled towards PRIOR_K when they span little of x
        sxx = sum((xx - xm) ** 2 for xx, _ in pts)
        sxy = sum((xx - xm) * (yy - ym) for xx, yy in pts)
        k = min(10.0, max(0.5, (sxy + PRIOR_WEIGHT * PRIOR_K) / (sxx + PRIOR_WEIGHT)))
        return xm + (self.yt - ym) / k

    def _accepted(self) -> Point | None:
        """The accepted evaluation nearest the trend's crossing, if any."""
        ok = [e for e in self.points if self._done(e)]
        return min(ok, key=lambda e: (self._a_off(e) or 0.0, self._err(e))) if ok else None

    # --- the next step -----------------------------------------------------------------------------------

    def _toward(self, last: Point) -> float | None:
        """F is within its noise of the target but the activation ratio not yet where F crosses it: ln tau
        of that crossing (from one side, half as far again, to bracket it: creeping in from one side costs
        evaluations); None where this does not apply."""
        if self.acc.atol is None or not self._near(last):
            return None
        xc = self._crossing()
        if xc is None or any(abs(xc - math.log(e.tau)) <= 1e-6 for e in self.points):
            return None
        lo, hi = self._bracket()
        if lo is None or hi is None:
            xc += 0.5 * (xc - math.log(last.tau))
        return min(xc, 0.0)

    def _extrapolate(self, lo: Point | None, hi: Point | None) -> float:
        """ln tau beyond the one known side: on the trend, or a x3 step where it points back (flat, noisy,
        or F < 1 there); at most x10 per step."""
        x = self._trend()
        cur = lo if hi is None else hi
        up = 1.0 if hi is None else -1.0  # always away from the known side
        if x is None or up * (x - math.log(cur.tau)) <= 0:
            x = math.log(cur.tau) + up * math.log(3)
        cap = math.log(10)
        x = min(max(x, math.log(cur.tau) - cap), math.log(cur.tau) + cap)
        return min(max(x, math.log(TAU_MIN)), 0.0)

    def solve(self, evaluate: Callable[[float], T], point: Callable[[T], Point] = _as_point) -> SolveResult[T]:
        """Evaluate taus until one is accepted (or the target is out of reach, or evaluations run out).
        `point` turns what `evaluate` returns into a `Point` (default: it is one, or has `.point`)."""
        got: dict[int, T] = {}

        def run(tau: float) -> Point:
            ev = evaluate(tau)
            p = point(ev)
            self.points.append(p)
            got[len(self.points) - 1] = ev
            return p

        def result(p: Point, status: int, message: str) -> SolveResult[T]:
            return SolveResult(got[self.points.index(p)], p, status, message, list(self.points))

        last = run(self.tau0)
        same_side = 0
        while self._accepted() is None and len(self.points) < self.max_evals:
            lo, hi = self._bracket()
            if hi is None and max(e.tau for e in self.points) >= 1.0:
                top = max(self.points, key=lambda e: e.tau)
                return result(top, OUT_OF_REACH_HIGH, f"even tau = 1 keeps the PPL ratio at {top.ppl_ratio:.4f} "
                              f"< target {self.target:.4f}")
            if lo is None and min(e.tau for e in self.points) <= TAU_MIN:
                return result(last, OUT_OF_REACH_LOW, f"even tau = {TAU_MIN:g} exceeds the target PPL ratio")
            x = self._toward(last)
            if x is None and (lo is None or hi is None):
                x = self._extrapolate(lo, hi)
            elif x is None:
                xa, xb = math.log(lo.tau), math.log(hi.tau)
                if xb - xa < self.acc.xtol:
                    break
                prev = self.points[-2:]
                same_side = same_side + 1 if len(prev) == 2 and (self._g(prev[0]) < 0) == (self._g(prev[1]) < 0) else 0
                x = self._crossing()  # the chord across the bracket (the trend where there is no usable chord)
                if x is None or same_side >= 2 or not xa < x < xb:  # the trend misses, or points out: bisect
                    x, same_side = (xa + xb) / 2, 0
                margin = 0.02 * (xb - xa)
                x = min(max(x, xa + margin), xb - margin)
            last = run(math.exp(x))
        if (ans := self._accepted()) is not None:
            return result(ans, CONVERGED, "accepted")
        best = min(self.points, key=self._err)
        if self._err(best) <= self.acc.accept:
            return result(best, BRACKET_CLOSED, f"bracket narrower than xtol; closest within {self.acc.accept:g}")
        status = MAX_EVALS if len(self.points) >= self.max_evals else NOT_CLOSE
        return result(best, status, f"stopped after {len(self.points)} evaluations; closest PPL ratio "
                      f"{best.ppl_ratio:.5f}")
