"""CETT-PPL-p%: find the tau at which perplexity rises by p% over the dense model.

The design and its invariants: docs/cett-ppl-search.md.

Two searches give the same answer:
- `reference_search`: the authors' published procedure (bisection on tau in [0, 1]; every round redoes
  the dense pass, every per-layer 65,536-point search and a sparse pass).
- `fast_search` (default): the dense pass and the per-layer CETT statistics do not depend on tau, so they
  are done once per batch; per-layer searches are batched over layers and memoised across taus; tau is
  found by aiming at the crossing of a line fitted to (ln tau, ln ln F), in a handful of evaluations.
  An evaluation runs every batch (with `early_stop`, it stops after the first ones when they already put
  F clearly off target, and then only steers: off by default, see `Batchwise`). F of a finite sample is a
  noisy step function of tau (about 1e-4 on 64K tokens, up to 3e-4 on some), so an answer is accepted
  within 3e-4 of the target PPL ratio (widened as 1/sqrt(tokens) on smaller samples, to at most 5e-4)
  once its activation ratio is within 0.001 of where F crosses the target (on the chord across the
  bracket, or the trend): where F is flat in tau, 3e-4 of F alone can be 0.005 of activation ratio.
  Memory is bounded by `calib_tokens` (dense intermediates held at once), never by the number of
  evaluation tokens: batches beyond it are streamed at the found tau (dense pass, search and sparse
  pass, then freed).

Both use the per-batch regime the paper's numbers use (thresholds re-searched on every batch) and the
authors' aggregation: the PPL ratio is the mean over batches of exp(loss_sparse - loss_dense).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from sparsinglaw.errors import UserError
from sparsinglaw.metrics import DenseLayers, ThresholdSearch, reference_layer_threshold, thresholds_all
from sparsinglaw.sparse import LaunchedPass, Model, PassResult, Rule, launch_pass, run_pass

T = TypeVar("T")

FTOL = 1e-4  # |PPL ratio / target - 1| always accepted
LOOSE = 3e-4  # accepted up to this (a little over twice the noise of F on 64K tokens) where the trend puts tau
ATOL = 1e-3  # accepted within this activation ratio of where the trend of F crosses the target
LOOSE_TOKENS = 65536  # the sample size LOOSE was measured on
LOOSE_MAX = 5e-4  # LOOSE widened as 1/sqrt(tokens) on smaller samples, up to this
PRIOR_K = 1.5  # the slope of ln ln F against ln tau assumed before evaluations span enough of tau
PRIOR_WEIGHT = 0.004  # weight of PRIOR_K in the trend fit, in units of sum (ln tau - mean)^2
EARLY_STOP_TOKENS = 8192  # batches smaller than this are too noisy to stop an evaluation on
SPREAD_UNKNOWN = 0.35  # relative spread of one batch's ln F around the whole set's, before any full evaluation
SPREAD_KNOWN = 0.1  # the same once each batch's ratio to the whole set is known (noise and a little drift)


@dataclass
class Evaluation:
    """Everything measured at one tau over a set of batches."""

    tau: float
    ppl_ratio: float  # mean over batches of exp(loss_sparse - loss_dense)
    loss_dense: float  # mean over batches
    loss_sparse: float
    kept: torch.Tensor  # (L,) kept (token, neuron) pairs
    tokens: int
    d_ff: int
    thresholds: torch.Tensor  # (batches, L) per-batch layer thresholds
    batch_ratios: list[float] = field(default_factory=list)
    neuron_kept: torch.Tensor | None = None
    token_ratio: torch.Tensor | None = None
    partial: bool = False  # stopped after the first batches: F is clearly off; steers, is never the answer

    @property
    def layer_ratio(self) -> torch.Tensor:
        return (self.kept / (self.tokens * self.d_ff)).cpu()

    @property
    def activation_ratio(self) -> float:
        return float(self.layer_ratio.mean())

    def brief(self) -> dict:
        return {"tau": self.tau, "ppl_ratio": self.ppl_ratio, "activation_ratio": self.activation_ratio}


@dataclass
class SearchResult:
    method: str
    tau: float
    target: float
    evaluation: Evaluation
    history: list[dict]
    forward_passes: int  # batch forward passes, dense and sparse
    full_passes: float  # the same in passes over the whole evaluation set
    masked_products: int  # per-layer CETT probes, each a masked (m x d_f)(d_f x d_h) product
    seconds: float
    message: str = ""
    breakdown: dict = field(default_factory=dict)  # seconds in dense passes, threshold searches, sparse passes
    updated_products: int = 0  # masked products done as sparse updates of a nearby one (kernels.cett_update)

    def to_json(self) -> dict:
        return {"method": self.method, "tau": self.tau, "target_ppl_ratio": self.target,
                "evaluations": len(self.history), "forward_passes": self.forward_passes,
                "full_passes": self.full_passes, "masked_products": self.masked_products,
                "updated_products": self.updated_products,
                "seconds": self.seconds, "breakdown": self.breakdown, "history": self.history,
                "message": self.message}


class PassCounter:
    """Forward passes, masked products and seconds per phase spent, for the cost reports."""

    def __init__(self, n_batches: int):
        self.passes = 0
        self.products = 0
        self.updates = 0
        self.n_batches = n_batches
        self.seconds = {"dense": 0.0, "grids": 0.0, "thresholds": 0.0, "sparse": 0.0}

    def timed(self, phase: str, t0: float) -> None:
        self.seconds[phase] += time.perf_counter() - t0


def combine(tau: float, parts: list[tuple[float, PassResult, torch.Tensor]]) -> Evaluation:
    """Merge per-batch (dense loss, sparse pass, thresholds) into one Evaluation."""
    ratios = [math.exp(r.loss - dl) for dl, r, _ in parts]
    first = parts[0][1]
    ev = Evaluation(
        tau=tau, ppl_ratio=sum(ratios) / len(ratios),
        loss_dense=sum(dl for dl, _, _ in parts) / len(parts),
        loss_sparse=sum(r.loss for _, r, _ in parts) / len(parts),
        kept=sum(r.kept for _, r, _ in parts), tokens=sum(r.tokens for _, r, _ in parts), d_ff=first.d_ff,
        thresholds=torch.stack([t.float().cpu() for _, _, t in parts]), batch_ratios=ratios,
        token_ratio=first.token_ratio.cpu() if first.token_ratio is not None else None)
    if first.neuron_kept is not None:
        ev.neuron_kept = sum(r.neuron_kept for _, r, _ in parts).cpu()
    return ev


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def check_p(p: float) -> float:
    if not (p > 0 and math.isfinite(p)):
        raise UserError(f"--p must be a positive percentage (got {p}); e.g. --p 1 for CETT-PPL-1%")
    return 1.0 + p / 100.0


# --- the root finder ----------------------------------------------------------------------------------

def solve_tau(evaluate: Callable[[float], Evaluation], target: float, ftol: float = FTOL, tau0: float = 0.1,
              max_evals: int = 40, xtol: float = 1e-3, accept: float = 1e-3,
              loose: float = LOOSE, atol: float | None = ATOL) -> tuple[Evaluation, str]:
    """Find tau with PPL ratio F = target.

    ln F rises with tau roughly as a power law, so y = ln ln F is nearly a line in x = ln tau (slope k,
    0.9-4.6 on trained models). Until the target is bracketed, every step aims at the crossing of that
    line, its slope fitted to all evaluations (pulled towards PRIOR_K when they span little of x) and placed
    through those nearest the target; at most x10 per step, x3 while only partial evaluations exist.
    Inside a bracket it follows the chord between the bracket's ends (the line bends, so a global slope
    creeps in from one side), and bisection takes over when a side stalls.

    F measured on a finite sample is a noisy step function of tau (about 1e-4 on 64K tokens of a 0.1B
    model, in fp32 as in bf16), so chasing it closer than the noise only moves the answer along the
    noise. An evaluation is the answer when |F/target - 1| <= loose (for 64K tokens; widened as
    1/sqrt(tokens) on fewer, to at most LOOSE_MAX) and its activation ratio is within `atol` (widened
    alike) of the activation ratio (interpolated in ln tau between evaluations: it is smooth where F is
    not) where F crosses the target. Once F is within `loose`, the next step goes to that crossing (from
    one side, half as far again, to bracket it). Evaluations without an activation ratio (and a first one) are judged by
    F alone: |F/target - 1| <= ftol, or <= loose from the third on; so is every evaluation with
    atol=None (a quick view, as the online tracker takes). Once the bracket is narrower than `xtol`
    (relative, in tau) the closest evaluation is returned if it is within `accept`.

    `evaluate` may return a partial evaluation (`partial=True`: measured on the first batches only,
    because they already put F clearly away from the target; see `stop_early`). It steers like any
    point, its ln F rescaled by ln F_full / ln F_same_batches of the nearest full evaluation, but it is
    never the answer.
    """
    lt = math.log(target)
    yt = math.log(lt)
    evals: list[Evaluation] = []

    def run(tau: float) -> Evaluation:
        ev = evaluate(tau)
        evals.append(ev)
        return ev

    def ln_f(ev: Evaluation) -> float:
        """ln F; for a partial evaluation, scaled to the full set by the nearest full one's same batches."""
        raw = math.log(ev.ppl_ratio)
        full = [e for e in evals if not _partial(e)]
        if not _partial(ev) or not full:
            return raw
        f = min(full, key=lambda e: abs(math.log(e.tau / ev.tau)))
        n = len(ev.batch_ratios)
        same = math.log(sum(f.batch_ratios[:n]) / n)
        return raw * math.log(f.ppl_ratio) / same if same > 1e-9 and math.log(f.ppl_ratio) > 1e-9 else raw

    def g(ev: Evaluation) -> float:
        return ln_f(ev) - lt

    def y(ev: Evaluation) -> float:
        return math.log(ln_f(ev))

    def widen(ev: Evaluation) -> float:
        """The noise of F falls as 1/sqrt(tokens): tolerances set for 64K tokens are widened by this on
        fewer, so that `loose` reaches at most LOOSE_MAX (wider lets tau stray from the reference's)."""
        tokens = getattr(ev, "tokens", None)
        scale = math.sqrt(max(1.0, LOOSE_TOKENS / tokens)) if tokens else 1.0
        return max(1.0, min(LOOSE_MAX / loose, scale)) if loose > 0 else 1.0

    def near(ev: Evaluation) -> bool:
        """F within `loose` of the target (widened on fewer tokens)."""
        return not _partial(ev) and abs(ev.ppl_ratio / target - 1) <= loose * widen(ev)

    def done(ev: Evaluation) -> bool:
        if _partial(ev):
            return False
        err = abs(ev.ppl_ratio / target - 1)
        off = a_off(ev) if atol is not None else None
        if off is None:  # asked to, no activation ratios to judge by, or one evaluation: by F alone
            return err <= ftol or (near(ev) and len(evals) >= 3)
        return near(ev) and off <= atol * widen(ev)

    def a_off(ev: Evaluation) -> float | None:
        """|activation ratio - its value where the trend of F crosses the target|, from the activation
        ratios measured so far (smooth in ln tau, unlike F); None without two full evaluations."""
        full = sorted((e for e in evals if not _partial(e) and hasattr(e, "activation_ratio")),
                      key=lambda e: e.tau)
        x = crossing()
        if len(full) < 2 or x is None:
            return None
        xs = [math.log(e.tau) for e in full]
        i = min(max(1, sum(v < x for v in xs)), len(xs) - 1)  # interpolate between, or extend the two nearest
        w = (x - xs[i - 1]) / (xs[i] - xs[i - 1]) if xs[i] > xs[i - 1] else 0.0
        a = full[i - 1].activation_ratio + w * (full[i].activation_ratio - full[i - 1].activation_ratio)
        return abs(ev.activation_ratio - a)

    def chord(lo: Evaluation | None, hi: Evaluation | None) -> float | None:
        """ln tau where the chord across the bracket (lo, hi) reaches the target; None without a usable one.
        ln ln F bends (its local slope varied 2x across brackets on a 0.1B model), and a line with one
        global slope then creeps in from one side."""
        if lo is None or hi is None or ln_f(lo) <= 1e-9 or y(hi) <= y(lo):
            return None
        xa, xb = math.log(lo.tau), math.log(hi.tau)
        return xa + (yt - y(lo)) / (y(hi) - y(lo)) * (xb - xa)

    def crossing() -> float | None:
        """ln tau where F crosses the target: on the chord across the bracket when there is one, else on
        the trend."""
        x = chord(*bracket())
        return x if x is not None else trend()

    def bracket() -> tuple[Evaluation | None, Evaluation | None]:
        """The tightest (below, above) pair; full evaluations first, and never inverted by noise."""
        lo = hi = None
        for e in sorted(evals, key=_partial):
            if g(e) < 0 and (lo is None or e.tau > lo.tau) and (hi is None or e.tau < hi.tau):
                lo = e
            elif g(e) >= 0 and (hi is None or e.tau < hi.tau) and (lo is None or e.tau > lo.tau):
                hi = e
        return lo, hi

    def trend() -> float | None:
        """ln tau where the fitted line y = a + k x reaches the target (None: no point with ln F > 0)."""
        pts = [(math.log(e.tau), y(e), e) for e in evals if ln_f(e) > 1e-9]
        if not pts:
            return None
        # the line passes through the points nearest the target (weights fall with |y - yt|) ...
        wts = [1.0 / (abs(yy - yt) + 0.02) for _, yy, _ in pts]
        sw = sum(wts)
        xm = sum(w * xx for w, (xx, _, _) in zip(wts, pts)) / sw
        ym = sum(w * yy for w, (_, yy, _) in zip(wts, pts)) / sw
        # ... with a slope fitted to all of them, pulled towards PRIOR_K when they span little of x
        sxx = sum((xx - xm) ** 2 for xx, _, _ in pts)
        sxy = sum((xx - xm) * (yy - ym) for xx, yy, _ in pts)
        k = min(10.0, max(0.5, (sxy + PRIOR_WEIGHT * PRIOR_K) / (sxx + PRIOR_WEIGHT)))
        return xm + (yt - ym) / k

    def accepted() -> Evaluation | None:
        """The accepted evaluation nearest the trend's crossing, if any."""
        ok = [e for e in evals if done(e)]
        return min(ok, key=lambda e: (a_off(e) or 0.0, abs(e.ppl_ratio / target - 1))) if ok else None

    ev = run(tau0)
    same_side = 0
    while accepted() is None and len(evals) < max_evals:
        lo, hi = bracket()
        if hi is None and max(e.tau for e in evals) >= 1.0:
            top = max(evals, key=lambda e: (e.tau, not _partial(e)))
            return top, f"even tau = 1 keeps the PPL ratio at {top.ppl_ratio:.4f} < target {target:.4f}"
        if lo is None and min(e.tau for e in evals) <= 1e-7:
            return ev, "even tau = 1e-7 exceeds the target PPL ratio"
        if (atol is not None and near(ev) and (xc := crossing()) is not None
                and all(abs(xc - math.log(e.tau)) > 1e-6 for e in evals)):
            # F is already within its noise of the target, and the activation ratio not yet where F crosses
            # it. In a bracket, go there; from one side, half as far again, to bracket it (the trend's
            # slope comes from farther points, and creeping in from one side costs evaluations)
            if lo is None or hi is None:
                xc += 0.5 * (xc - math.log(ev.tau))
            xc = min(max(xc, math.log(ev.tau / 3)), math.log(ev.tau * 3), 0.0)  # F is near: so is tau
            ev = run(math.exp(xc))
            continue
        if lo is None or hi is None:  # extrapolate
            x = trend()
            cur = lo if hi is None else hi
            up = 1.0 if hi is None else -1.0  # always away from the known side
            if x is None or up * (x - math.log(cur.tau)) <= 0:  # no trend, or it points back (flat, noisy,
                x = math.log(cur.tau) + up * math.log(3)      # or F < 1 there): a geometric step instead
            # at most x10 per step; x3 while only partial evaluations (a batch or two) speak for the set
            cap = math.log(3) if all(_partial(e) for e in evals) else math.log(10)
            x = min(max(x, math.log(cur.tau) - cap), math.log(cur.tau) + cap)
            x = min(max(x, math.log(1e-7)), 0.0)
        else:
            xa, xb = math.log(lo.tau), math.log(hi.tau)
            if xb - xa < xtol:
                break
            prev = evals[-2:]
            same_side = same_side + 1 if len(prev) == 2 and (g(prev[0]) < 0) == (g(prev[1]) < 0) else 0
            x = crossing()  # the chord across the bracket (the trend where there is no usable chord)
            if x is None or same_side >= 2 or not xa < x < xb:  # the trend misses, or points out: bisect
                x, same_side = (xa + xb) / 2, 0
            margin = 0.02 * (xb - xa)
            x = min(max(x, xa + margin), xb - margin)
        ev = run(math.exp(x))
    if (ans := accepted()) is not None:
        return ans, ""
    best = min((e for e in evals if not _partial(e)), key=lambda e: abs(e.ppl_ratio / target - 1),
               default=evals[-1])
    if abs(best.ppl_ratio / target - 1) <= accept:
        return best, ""
    return best, f"stopped after {len(evals)} evaluations; closest PPL ratio {best.ppl_ratio:.5f}"


def _partial(ev: Evaluation) -> bool:
    return getattr(ev, "partial", False)


def stop_early(ln_fs: list[float], scales: list[float] | None, target: float) -> bool:
    """Whether the batches measured so far (their ln F, in order) put the whole set's F clearly (two
    spreads) away from the target, so the remaining batches need not be run at this tau.

    scales: each batch's ln F over the whole set's at an earlier full evaluation (None before the first).
    """
    n = len(ln_fs)
    if scales is not None:
        est = sum(lf / sc for lf, sc in zip(ln_fs, scales)) / n
        spread = SPREAD_KNOWN
    else:
        est, spread = sum(ln_fs) / n, SPREAD_UNKNOWN
    if est <= 0:
        return True
    return abs(math.log(est / math.log(target))) > 2 * spread / math.sqrt(n)


class Batchwise:
    """Runs one tau's batches in order; with `early_stop`, stops once those run put F clearly off target
    (a partial evaluation costs a fraction of a full one and only steers the solver). It learns each
    batch's ln F relative to the whole set's from full evaluations, and never stops two evaluations in
    a row, so a batch whose ratio was misjudged cannot steer the search for long.

    Early stopping is off by default. Each batch's share of the PPL rise drifts with tau and is rough
    (one batch's ln F was 2.5 times the set's at one tau on a 1.2B model), so partial evaluations near
    the target misjudge it and cost more evaluations than they save: replayed on real curves (`python
    benchmarks/dev/solver_sim.py --curves ...`, 6 slices x 24 batch orders) the solver needed 3.33 full
    evaluations on average (at most 4) without it, 3.94 (up to 7.25) with it."""

    def __init__(self, n: int, target: float, batch_tokens: int = EARLY_STOP_TOKENS, early_stop: bool = False):
        # a batch speaks for the whole set (its ln F for stopping early, its thresholds as the next batch's
        # first guess) only when it is large: below EARLY_STOP_TOKENS its noise swamps the spread
        self.n, self.target, self.early_stop = n, target, early_stop
        self.representative = n > 1 and batch_tokens >= EARLY_STOP_TOKENS
        self.scales: list[float] | None = None
        self.last_partial = False

    @property
    def stops(self) -> bool:
        """Whether an evaluation may stop after its first batches (it then reads each batch's ln F)."""
        return self.early_stop and self.representative

    def run(self, run_batch: Callable[[int], tuple[T, float]]) -> list[T]:
        """run_batch(i) -> (result, ln F of batch i); returns the results of the batches run."""
        out, ln_fs = [], []
        for i in range(self.n):
            res, lf = run_batch(i)
            out.append(res)
            ln_fs.append(lf)
            stop = self.stops and i + 1 < self.n and not self.last_partial
            if stop and stop_early(ln_fs, self.scales, self.target):
                break
        self.last_partial = len(out) < self.n
        return out

    def learn(self, ev: Evaluation) -> None:
        """After a full evaluation: each batch's ln F over the whole set's (kept when F is too near 1); only
        early stopping reads them."""
        if not self.early_stop:
            return
        whole = math.log(ev.ppl_ratio)
        lfs = [math.log(r) for r in ev.batch_ratios]
        if not ev.partial and whole > 1e-4 and min(lfs) > 0:
            self.scales = [lf / whole for lf in lfs]


# --- fast search ----------------------------------------------------------------------------------------

class BatchState:
    """One batch's dense loss and memoised per-layer threshold search (its grids queued at once, and read
    back at first use)."""

    def __init__(self, m: Model, ids: torch.Tensor, positions: str, counter: PassCounter):
        t0 = time.perf_counter()
        dense = run_pass(m, ids, Rule("dense"), positions, capture=True)
        counter.passes += 1
        self.ids = ids
        self.loss_dense = dense.loss
        counter.timed("dense", t0)
        t0 = time.perf_counter()
        self._counter = counter
        self._dense = DenseLayers.build(dense.dense_h, m.w_stack, m.norm_stack)
        self._ends = self._dense.grid_ends()
        self._search: ThresholdSearch | None = None
        counter.timed("grids", t0)

    @property
    def search(self) -> ThresholdSearch:
        """The memoised threshold search; its grids are read back here, at first use."""
        if self._search is None:
            t0 = time.perf_counter()
            self._search = ThresholdSearch(self._dense, self._dense.grids(self._ends))
            self._counter.timed("grids", t0)
        return self._search


def evaluate_states(m: Model, states: list[BatchState], tau: float, positions: str, counter: PassCounter,
                    detail: bool, hint: ThresholdSearch | None = None, launch: bool = False
                    ) -> list[tuple[float, PassResult | LaunchedPass, torch.Tensor]]:
    """Sparse pass of every held batch at `tau` (thresholds from each batch's memoised search, all
    batches' searches stepped together). launch: return the passes queued, not read
    back (`resolved` reads them), so that the host goes on to other work meanwhile."""
    def counts() -> tuple[int, int]:
        return (sum(st.search.evaluations for st in states), sum(st.search.dense.updated_probes for st in states))

    before, t0 = counts(), time.perf_counter()
    ths = thresholds_all([st.search for st in states], tau, hint)
    after = counts()
    counter.products += after[0] - before[0]
    counter.updates += after[1] - before[1]
    counter.timed("thresholds", t0)
    parts = []
    for st, th in zip(states, ths):
        t0 = time.perf_counter()
        r = launch_pass(m, st.ids, Rule("cett", thresholds=th), positions, detail=detail)
        counter.passes += 1
        counter.timed("sparse", t0)
        parts.append((st.loss_dense, r, th))
    return parts if launch else resolved(parts, counter)


def resolved(parts: list[tuple[float, PassResult | LaunchedPass, torch.Tensor]], counter: PassCounter
             ) -> list[tuple[float, PassResult, torch.Tensor]]:
    """The launched passes among `parts` read back (waiting for the device: counted as sparse-pass time)."""
    t0 = time.perf_counter()
    out = [(dl, r.result() if isinstance(r, LaunchedPass) else r, th) for dl, r, th in parts]
    counter.timed("sparse", t0)
    return out


def stream(m: Model, batches: list[torch.Tensor], tau: float, positions: str, counter: PassCounter,
           detail: bool) -> list[tuple[float, PassResult, torch.Tensor]]:
    """Batches beyond the calibration budget: dense pass, thresholds, sparse pass, then freed."""
    parts = []
    for ids in batches:
        st = BatchState(m, ids, positions, counter)
        parts += evaluate_states(m, [st], tau, positions, counter, detail)
        del st
    return parts


def split_calibration(batches: list[torch.Tensor], calib_tokens: int | None) -> tuple[list, list]:
    """Batches whose dense intermediates are held during the tau search, and the rest (streamed).

    When anything is streamed, one batch of the budget is left for the streamed batch in flight, so the
    peak memory is the same whatever the number of evaluation tokens."""
    if calib_tokens is None:
        return batches, []
    n, tot = 0, 0
    for b in batches:
        if n and tot + b.numel() > calib_tokens:
            break
        n, tot = n + 1, tot + b.numel()
    if n < len(batches) and n > 1:
        n -= 1
    return batches[:n], batches[n:]


def fast_search(m: Model, batches: list[torch.Tensor], p: float, positions: str = "all",
                calib_tokens: int | None = None, ftol: float = FTOL, tau0: float = 0.1,
                progress: bool = True, max_evals: int = 40, early_stop: bool = False,
                atol: float | None = ATOL) -> SearchResult:
    target = check_p(p)
    t0 = time.perf_counter()
    counter = PassCounter(len(batches))
    calib, rest = split_calibration(batches, calib_tokens)
    _say(f"fast search: dense pass on {sum(b.numel() for b in calib)} calibration tokens"
         + (f", {len(rest)} more batches streamed" if rest else ""), progress)
    states = [BatchState(m, ids, positions, counter) for ids in calib]
    history: list[dict] = []

    batchwise = Batchwise(len(states), target, min(st.ids.numel() for st in states), early_stop)

    def evaluate(tau: float) -> Evaluation:
        """All held batches at tau, one after the other (with early_stop: unless the first ones put F clearly
        off target)."""
        # the previous batch's thresholds at this tau: the next one's first guess, where batches are large
        # enough to agree (on 16K-token batches of a 0.1B model they cut probes by a fifth to a third; on
        # 1K-token batches of SmolLM2-135M they added 7%)
        # unless early stopping reads each batch's loss as it comes, a batch's sparse pass is left running
        # while the next batch's thresholds are searched, and read back at the end
        launch = not batchwise.stops

        def one(i: int) -> tuple[tuple, float]:
            hint = states[i - 1].search if i and batchwise.representative else None
            part = evaluate_states(m, [states[i]], tau, positions, counter, detail=True, hint=hint,
                                   launch=launch)[0]
            return part, 0.0 if launch else part[1].loss - part[0]

        parts = resolved(batchwise.run(one), counter)
        ev = combine(tau, parts)
        ev.partial = len(parts) < len(states)
        batchwise.learn(ev)
        history.append({**ev.brief(), "batches": len(parts)})
        _say(f"  tau={tau:.6f}  ppl_ratio={ev.ppl_ratio:.5f}  activation_ratio={ev.activation_ratio:.4f}"
             + (f"  ({len(parts)} of {len(states)} batches: clearly off)" if ev.partial else ""), progress)
        return ev

    ev, message = solve_tau(evaluate, target, ftol=ftol, tau0=tau0, max_evals=max_evals, atol=atol)
    calib_ev = ev
    if rest:
        # stream the rest at the calibrated tau; correct tau if the full set disagrees beyond the tolerance
        for _ in range(3):
            parts = evaluate_states(m, states, ev.tau, positions, counter, detail=True)
            for st in states:  # room for the streamed batch in flight
                st.search.dense.drop_products()
            parts += stream(m, rest, ev.tau, positions, counter, detail=True)
            full = combine(ev.tau, parts)
            history.append({**full.brief(), "batches": len(batches)})
            _say(f"  all {len(batches)} batches at tau={ev.tau:.6f}: ppl_ratio={full.ppl_ratio:.5f}", progress)
            if (abs(full.ppl_ratio / target - 1) <= max(ftol, 2 * LOOSE) or full.ppl_ratio <= 1
                    or calib_ev.ppl_ratio <= 1 or message):  # close enough, nothing to scale, or calibration failed
                break
            # the full set's ln F is a near-constant multiple of the calibration set's: retarget
            scale = math.log(calib_ev.ppl_ratio) / math.log(full.ppl_ratio)
            calib_ev, message = solve_tau(evaluate, math.exp(math.log(target) * scale), ftol=ftol, tau0=ev.tau,
                                          atol=atol)
            ev = calib_ev
        ev = full
    seconds = time.perf_counter() - t0
    return SearchResult("fast", ev.tau, target, ev, history, counter.passes, counter.passes / len(batches),
                        counter.products, seconds, message, breakdown=counter.seconds,
                        updated_products=counter.updates)


# --- reference search -----------------------------------------------------------------------------------

def reference_search(m: Model, batches: list[torch.Tensor], p: float, positions: str = "all",
                     tol: float = 1e-6, progress: bool = True) -> SearchResult:
    """The authors' procedure, kept deliberately naive: it is the cost the fast search must beat."""
    target = check_p(p)
    t0 = time.perf_counter()
    counter = PassCounter(len(batches))
    w = m.w_stack
    history: list[dict] = []
    lo, hi = 0.0, 1.0
    ev = None
    while hi - lo > tol:
        tau = (lo + hi) / 2
        parts = []
        for ids in batches:
            dense = run_pass(m, ids, Rule("dense"), positions, capture=True)
            th = torch.tensor([reference_layer_threshold(h, w[i].to(h.dtype), m.norms[i], tau)
                               for i, h in enumerate(dense.dense_h)], device=m.device)
            counter.products += m.n_layers * 16
            r = run_pass(m, ids, Rule("cett", thresholds=th), positions, detail=True)
            counter.passes += 2
            parts.append((dense.loss, r, th))
            del dense
        ev = combine(tau, parts)
        history.append({**ev.brief(), "batches": len(batches)})
        _say(f"  [reference] tau={tau:.7f}  ppl_ratio={ev.ppl_ratio:.5f}  "
             f"activation_ratio={ev.activation_ratio:.4f}", progress)
        if ev.ppl_ratio > target:
            hi = tau
        else:
            lo = tau
    seconds = time.perf_counter() - t0
    return SearchResult(f"reference(tol={tol:g})", ev.tau, target, ev, history, counter.passes,
                        counter.passes / len(batches), counter.products, seconds)
