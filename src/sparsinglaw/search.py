"""CETT-PPL-p%: find the tau at which perplexity rises by p% over the dense model (SPEC section 2).

Two searches give the same answer:
- `reference_search`: the authors' published procedure (bisection on tau in [0, 1]; every round redoes
  the dense pass, every per-layer 65,536-point search and a sparse pass).
- `fast_search` (default): the dense pass and the per-layer CETT statistics do not depend on tau, so they
  are done once per batch; per-layer searches are batched over layers and batches and memoised across
  taus; tau is found by a safeguarded secant on log-log coordinates in a handful of sparse passes, and
  accepted within 1e-4 of the target PPL ratio, or within 5e-4 while the local slope of the activation
  ratio says it is within 5e-4 of its value at the exact target. Memory is bounded
  by `calib_tokens` (dense intermediates held at once), never by the number of evaluation tokens: batches
  beyond it are streamed at the found tau (dense pass, search and sparse pass, then freed).

Both use the per-batch regime the paper's numbers use (thresholds re-searched on every batch) and the
authors' aggregation: the PPL ratio is the mean over batches of exp(loss_sparse - loss_dense).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sparsinglaw.errors import UserError
from sparsinglaw.metrics import DenseLayers, ThresholdSearch, reference_layer_threshold, thresholds_all
from sparsinglaw.sparse import Model, PassResult, Rule, run_pass

FTOL = 1e-4  # |PPL ratio / target - 1| always accepted
LOOSE = 5e-4  # also accepted up to this (half the 0.1% the answer must be within) ...
ATOL = 5e-4  # ... while the activation ratio is within this (a quarter of the 0.002 allowed) of its exact value


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
    masked_products: int  # per-layer masked (m x d_f)(d_f x d_h) products for CETT
    seconds: float
    message: str = ""
    breakdown: dict = field(default_factory=dict)  # seconds in dense passes, threshold searches, sparse passes

    def to_json(self) -> dict:
        return {"method": self.method, "tau": self.tau, "target_ppl_ratio": self.target,
                "evaluations": len(self.history), "forward_passes": self.forward_passes,
                "full_passes": self.full_passes, "masked_products": self.masked_products,
                "seconds": self.seconds, "breakdown": self.breakdown, "history": self.history,
                "message": self.message}


class PassCounter:
    """Forward passes, masked products and seconds per phase spent, for the cost reports."""

    def __init__(self, n_batches: int):
        self.passes = 0
        self.products = 0
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
              max_evals: int = 40, xtol: float = 1e-3, accept: float = 1e-3, loose: float = LOOSE,
              atol: float = ATOL) -> tuple[Evaluation, str]:
    """Find tau with PPL ratio = target.

    Done when |ratio/target - 1| <= ftol, or <= loose while the activation ratio's distance to its
    value at the exact target, estimated from the local slope dA/dF of two evaluations, is <= atol:
    a model whose sparsity moves fast with F gets the tighter PPL tolerance it needs.

    PPL ratio rises with tau roughly as ln F ~ c * tau^k, so a secant on (ln tau, ln ln F) is nearly
    linear; it is safeguarded by a bracket (Illinois-style) and falls back to bisection in ln tau.
    Thresholds sit on a discrete grid, so F moves in small jumps: once the bracket is narrower than
    `xtol` (relative, in tau) the closest evaluation is returned if it is within `accept` of the target.
    """
    lt = math.log(target)
    evals: list[Evaluation] = []

    def run(tau: float) -> Evaluation:
        ev = evaluate(tau)
        evals.append(ev)
        return ev

    def g(ev: Evaluation) -> float:
        return math.log(ev.ppl_ratio) - lt

    def y(ev: Evaluation) -> float:  # near-linear in ln tau when ln F > 0
        return math.log(max(math.log(ev.ppl_ratio), 1e-12))

    def done(ev: Evaluation) -> bool:
        err = abs(ev.ppl_ratio / target - 1)
        if err <= ftol:
            return True
        others = [e for e in evals if e is not ev and e.ppl_ratio != ev.ppl_ratio]
        if err > loose or not others or getattr(ev, "activation_ratio", None) is None:
            return False
        near = min(others, key=lambda e: abs(e.ppl_ratio - ev.ppl_ratio))
        slope = (near.activation_ratio - ev.activation_ratio) / (near.ppl_ratio - ev.ppl_ratio)
        return abs(slope * (ev.ppl_ratio - target)) <= atol

    ev = run(tau0)
    if done(ev):
        return ev, ""
    lo, hi = (ev, None) if g(ev) < 0 else (None, ev)
    # 1. bracket: extrapolate in log-log, at most x10 per step
    while (lo is None or hi is None) and len(evals) < max_evals:
        cur = lo if hi is None else hi
        if hi is None and cur.tau >= 1.0:
            return cur, f"even tau = 1 keeps the PPL ratio at {cur.ppl_ratio:.4f} < target {target:.4f}"
        if lo is None and cur.tau <= 1e-7:
            return cur, "even tau = 1e-7 exceeds the target PPL ratio"
        pos = [e for e in evals if math.log(e.ppl_ratio) > 1e-9]
        # slope of ln ln F against ln tau, measured from the last two evaluations once there are two. Trained
        # models show 1.2-2.5; starting below the middle makes the first step overshoot a little, so the
        # second evaluation usually brackets the root and the secant then closes in on it
        k = 1.5
        if len(pos) >= 2 and pos[-1].tau != pos[-2].tau:
            k = (y(pos[-1]) - y(pos[-2])) / (math.log(pos[-1].tau) - math.log(pos[-2].tau))
            k = min(10.0, max(0.5, k))
        step = math.exp((math.log(lt) - y(cur)) / k) if math.log(cur.ppl_ratio) > 1e-9 else 10.0
        step = min(10.0, max(0.1, step))
        ev = run(min(1.0, cur.tau * step) if hi is None else max(1e-7, cur.tau * step))
        if done(ev):
            return ev, ""
        if g(ev) < 0:
            lo = ev if lo is None or ev.tau > lo.tau else lo
        else:
            hi = ev if hi is None or ev.tau < hi.tau else hi
    # 2. safeguarded secant inside [lo, hi]; an end kept twice in a row has its value halved (Illinois)
    kept_lo = kept_hi = 0
    while lo is not None and hi is not None and len(evals) < max_evals:
        xa, xb = math.log(lo.tau), math.log(hi.tau)
        if xb - xa < xtol:
            break
        if math.log(lo.ppl_ratio) > 1e-9:
            ya, yb, yt = y(lo), y(hi), math.log(lt)
        else:
            ya, yb, yt = g(lo), g(hi), 0.0
        ya = yt + (ya - yt) / 2 ** max(0, kept_lo - 1)
        yb = yt + (yb - yt) / 2 ** max(0, kept_hi - 1)
        x = xa + (yt - ya) * (xb - xa) / (yb - ya) if yb != ya else (xa + xb) / 2
        margin = 0.02 * (xb - xa)
        near = sorted((e for e in evals if math.log(e.ppl_ratio) > 1e-9), key=lambda e: abs(g(e)))[:2]
        if len(near) == 2 and near[0].tau != near[1].tau and y(near[0]) != y(near[1]):
            # plain secant through the two evaluations nearest the target: superlinear where the curve is
            # smooth; used when it falls inside the bracket, else the Illinois step above
            x1, x2 = math.log(near[0].tau), math.log(near[1].tau)
            xs = x1 + (math.log(lt) - y(near[0])) * (x2 - x1) / (y(near[1]) - y(near[0]))
            if xa + margin < xs < xb - margin:
                x = xs
        ev = run(math.exp(min(max(x, xa + margin), xb - margin)))
        if done(ev):
            return ev, ""
        if g(ev) < 0:
            lo, kept_lo, kept_hi = ev, 0, kept_hi + 1
        else:
            hi, kept_hi, kept_lo = ev, 0, kept_lo + 1
    best = min(evals, key=lambda e: abs(e.ppl_ratio / target - 1))
    if abs(best.ppl_ratio / target - 1) <= accept:
        return best, ""
    return best, f"stopped after {len(evals)} evaluations; closest PPL ratio {best.ppl_ratio:.5f}"


# --- fast search ----------------------------------------------------------------------------------------

class BatchState:
    """One batch's dense loss and memoised per-layer threshold search."""

    def __init__(self, m: Model, ids: torch.Tensor, positions: str, counter: PassCounter):
        t0 = time.perf_counter()
        dense = run_pass(m, ids, Rule("dense"), positions, capture=True)
        counter.passes += 1
        self.ids = ids
        self.loss_dense = dense.loss
        counter.timed("dense", t0)
        t0 = time.perf_counter()
        self.search = ThresholdSearch(DenseLayers.build(dense.dense_h, m.w_stack, m.norm_stack))
        counter.timed("grids", t0)


def evaluate_states(m: Model, states: list[BatchState], tau: float, positions: str, counter: PassCounter,
                    detail: bool) -> list[tuple[float, PassResult, torch.Tensor]]:
    """Sparse pass of every held batch at `tau` (thresholds from each batch's memoised search, all
    batches' searches stepped together)."""
    before, t0 = sum(st.search.evaluations for st in states), time.perf_counter()
    ths = thresholds_all([st.search for st in states], tau)
    counter.products += sum(st.search.evaluations for st in states) - before
    counter.timed("thresholds", t0)
    parts = []
    for st, th in zip(states, ths):
        t0 = time.perf_counter()
        r = run_pass(m, st.ids, Rule("cett", thresholds=th), positions, detail=detail)
        counter.passes += 1
        counter.timed("sparse", t0)
        parts.append((st.loss_dense, r, th))
    return parts


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
                progress: bool = True, max_evals: int = 40) -> SearchResult:
    target = check_p(p)
    t0 = time.perf_counter()
    counter = PassCounter(len(batches))
    calib, rest = split_calibration(batches, calib_tokens)
    _say(f"fast search: dense pass on {sum(b.numel() for b in calib)} calibration tokens"
         + (f", {len(rest)} more batches streamed" if rest else ""), progress)
    states = [BatchState(m, ids, positions, counter) for ids in calib]
    history: list[dict] = []

    def evaluate(tau: float) -> Evaluation:
        ev = combine(tau, evaluate_states(m, states, tau, positions, counter, detail=True))
        history.append({**ev.brief(), "batches": len(states)})
        _say(f"  tau={tau:.6f}  ppl_ratio={ev.ppl_ratio:.5f}  activation_ratio={ev.activation_ratio:.4f}", progress)
        return ev

    ev, message = solve_tau(evaluate, target, ftol=ftol, tau0=tau0, max_evals=max_evals)
    calib_ev = ev
    if rest:
        # stream the rest at the calibrated tau; correct tau if the full set disagrees beyond the tolerance
        for _ in range(3):
            parts = evaluate_states(m, states, ev.tau, positions, counter, detail=True)
            parts += stream(m, rest, ev.tau, positions, counter, detail=True)
            full = combine(ev.tau, parts)
            history.append({**full.brief(), "batches": len(batches)})
            _say(f"  all {len(batches)} batches at tau={ev.tau:.6f}: ppl_ratio={full.ppl_ratio:.5f}", progress)
            if (abs(full.ppl_ratio / target - 1) <= max(ftol, 2 * LOOSE) or full.ppl_ratio <= 1
                    or calib_ev.ppl_ratio <= 1 or message):  # close enough, nothing to scale, or calibration failed
                break
            # the full set's ln F is a near-constant multiple of the calibration set's: retarget
            scale = math.log(calib_ev.ppl_ratio) / math.log(full.ppl_ratio)
            calib_ev, message = solve_tau(evaluate, math.exp(math.log(target) * scale), ftol=ftol, tau0=ev.tau)
            ev = calib_ev
        ev = full
    seconds = time.perf_counter() - t0
    return SearchResult("fast", ev.tau, target, ev, history, counter.passes, counter.passes / len(batches),
                        counter.products, seconds, message, counter.seconds)


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
