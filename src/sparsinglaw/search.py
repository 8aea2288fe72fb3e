"""CETT-PPL-p%: find the tau at which perplexity rises by p% over the dense model.

The design and its invariants: docs/cett-ppl-search.md.

Two searches:
- `reference_search`: the authors' published procedure (bisection on tau in [0, 1]; every round redoes
  the dense pass, every per-layer 65,536-point search and a sparse pass with their drop test; the answer
  is the final midpoint, evaluated once more).
- `fast_search` (default): the dense pass and the per-layer CETT statistics do not depend on tau, so they
  are done once per batch; per-layer searches are batched over layers and memoised across taus, on the
  same candidates as the reference; tau is found by `solver.TauSolver` in a handful of evaluations.
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
from dataclasses import dataclass, field, replace

import torch

from sparsinglaw.errors import UserError
from sparsinglaw.metrics import DenseLayers, ThresholdSearch, reference_layer_threshold, thresholds_all
from sparsinglaw.solver import Acceptance, Point, TauSolver
from sparsinglaw.sparse import LaunchedPass, Model, PassResult, Rule, launch_pass, run_pass
from sparsinglaw.uncertainty import Band, Noise, band


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
    # per batch: (sum of loss_sparse - loss_dense over each block of predicted tokens, tokens per block),
    # what `uncertainty` resamples for the noise of F
    blocks: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)

    @property
    def layer_ratio(self) -> torch.Tensor:
        return (self.kept / (self.tokens * self.d_ff)).cpu()

    @property
    def activation_ratio(self) -> float:
        return float(self.layer_ratio.mean())

    @property
    def point(self) -> Point:
        """What the tau solver reads."""
        return Point(self.tau, self.ppl_ratio, self.activation_ratio, self.tokens)

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
    message: str = ""  # empty on success
    breakdown: dict = field(default_factory=dict)  # seconds in dense passes, threshold searches, sparse passes
    updated_products: int = 0  # masked products done as sparse updates of a nearby one (kernels.cett_update)
    acceptance: Acceptance | None = None  # the fast search's acceptance rule
    status: int | None = None  # the solver's status (fast search)
    band: Band | None = None  # the monotone fit's crossing over every evaluation, and its interval
    evaluations: list[Evaluation] = field(default_factory=list, repr=False)  # every full evaluation

    def to_json(self) -> dict:
        return {"method": self.method, "tau": self.tau, "target_ppl_ratio": self.target,
                "evaluations": len(self.history), "forward_passes": self.forward_passes,
                "full_passes": self.full_passes, "masked_products": self.masked_products,
                "updated_products": self.updated_products,
                "seconds": self.seconds, "breakdown": self.breakdown, "history": self.history,
                "message": self.message, "status": self.status,
                "acceptance": self.acceptance.to_json() if self.acceptance is not None else None,
                "evaluated": self.evaluation.brief()}


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


def combine(tau: float, parts: list[tuple[PassResult, PassResult, torch.Tensor]]) -> Evaluation:
    """Merge per-batch (dense pass, sparse pass, thresholds) into one Evaluation."""
    ratios = [math.exp(r.loss - d.loss) for d, r, _ in parts]
    first = parts[0][1]
    blocks = [(r.block_loss - d.block_loss, r.block_tokens) for d, r, _ in parts
              if r.block_loss is not None and d.block_loss is not None]
    ev = Evaluation(
        tau=tau, ppl_ratio=sum(ratios) / len(ratios),
        loss_dense=sum(d.loss for d, _, _ in parts) / len(parts),
        loss_sparse=sum(r.loss for _, r, _ in parts) / len(parts),
        kept=sum(r.kept for _, r, _ in parts), tokens=sum(r.tokens for _, r, _ in parts), d_ff=first.d_ff,
        thresholds=torch.stack([t.float().cpu() for _, _, t in parts]), batch_ratios=ratios,
        token_ratio=first.token_ratio.cpu() if first.token_ratio is not None else None,
        blocks=blocks if len(blocks) == len(parts) else [])
    if first.neuron_kept is not None:
        ev.neuron_kept = sum(r.neuron_kept for _, r, _ in parts).cpu()
    return ev


def _bar(items, desc: str, progress: bool, total: int | None = None):
    """A progress bar with ETA on stderr, removed when done (the search prints one line per tau)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, disable=not progress, file=sys.stderr, leave=False)


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def check_p(p: float) -> float:
    if not (p > 0 and math.isfinite(p)):
        raise UserError(f"--p must be a positive percentage (got {p}); e.g. --p 1 for CETT-PPL-1%")
    return 1.0 + p / 100.0


# --- fast search ----------------------------------------------------------------------------------------

HINT_TOKENS = 8192  # batches smaller than this are too noisy for one's thresholds to guide the next's


class BatchState:
    """One batch's dense loss and memoised per-layer threshold search (its grids queued at once, and read
    back at first use)."""

    def __init__(self, m: Model, ids: torch.Tensor, positions: str, counter: PassCounter):
        t0 = time.perf_counter()
        dense = run_pass(m, ids, Rule("dense"), positions, capture=True)
        counter.passes += 1
        self.ids = ids
        self.dense_pass = replace(dense, dense_h=None)  # its loss (and block losses): the dense side of F
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
                    ) -> list[tuple[PassResult, PassResult | LaunchedPass, torch.Tensor]]:
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
        parts.append((st.dense_pass, r, th))
    return parts if launch else resolved(parts, counter)


def resolved(parts: list[tuple[PassResult, PassResult | LaunchedPass, torch.Tensor]], counter: PassCounter
             ) -> list[tuple[PassResult, PassResult, torch.Tensor]]:
    """The launched passes among `parts` read back (waiting for the device: counted as sparse-pass time)."""
    t0 = time.perf_counter()
    out = [(dl, r.result() if isinstance(r, LaunchedPass) else r, th) for dl, r, th in parts]
    counter.timed("sparse", t0)
    return out


def stream(m: Model, batches: list[torch.Tensor], tau: float, positions: str, counter: PassCounter,
           detail: bool) -> list[tuple[PassResult, PassResult, torch.Tensor]]:
    """Batches beyond the calibration budget: dense pass, thresholds, sparse pass, then freed."""
    parts = []
    for ids in batches:
        st = BatchState(m, ids, positions, counter)
        parts += evaluate_states(m, [st], tau, positions, counter, detail)
        del st
    return parts


class FastSearch:
    """The CETT engine over held batches: each batch's dense pass, intermediates and candidate grids once
    (`BatchState`), then a sparse evaluation at any tau, the per-layer thresholds memoised across taus.
    What the tau solver, tracking, `tradeoff` and the benchmarks call.

    `evaluate(tau)` runs the batches one after the other, each batch's sparse pass left running while the
    next one's thresholds are searched, the previous batch's thresholds its first guess where batches are
    large enough to agree; `lockstep=True` steps every batch's search together instead (one host sync per
    step for all of them: better for many small batches)."""

    def __init__(self, m: Model, batches: list[torch.Tensor], positions: str = "all",
                 counter: PassCounter | None = None, progress: bool = False):
        self.m, self.positions, self.progress = m, positions, progress
        self.counter = counter or PassCounter(len(batches))
        self.states = [BatchState(m, ids, positions, self.counter)
                       for ids in _bar(batches, "dense pass", progress and len(batches) > 1)]
        # a batch's thresholds at a tau are the next batch's first guess where batches are large enough to
        # agree (on 16K-token batches of a 0.1B model they cut probes by a fifth to a third; on 1K-token
        # batches of SmolLM2-135M they added 7%)
        self.hinted = len(self.states) > 1 and min(st.ids.numel() for st in self.states) >= HINT_TOKENS

    @property
    def dense_passes(self) -> list[PassResult]:
        """Each batch's dense pass (loss and block losses; no intermediates)."""
        return [st.dense_pass for st in self.states]

    def thresholds(self, tau: float) -> list[torch.Tensor]:
        """Each batch's per-layer thresholds at tau."""
        return thresholds_all([st.search for st in self.states], tau)

    def parts(self, tau: float, detail: bool = True, lockstep: bool = False
              ) -> list[tuple[PassResult, PassResult, torch.Tensor]]:
        """Per batch (dense pass, sparse pass at tau, thresholds)."""
        if lockstep:
            return evaluate_states(self.m, self.states, tau, self.positions, self.counter, detail)
        out = []
        for i, st in enumerate(_bar(self.states, f"tau={tau:.6f}", self.progress and len(self.states) > 1)):
            hint = self.states[i - 1].search if i and self.hinted else None
            out += evaluate_states(self.m, [st], tau, self.positions, self.counter, detail=detail, hint=hint,
                                   launch=True)
        return resolved(out, self.counter)

    def evaluate(self, tau: float, detail: bool = True, lockstep: bool = False) -> Evaluation:
        return combine(tau, self.parts(tau, detail, lockstep))

    def drop_products(self) -> None:
        """Free every batch's kept products (see `DenseLayers.drop_products`)."""
        for st in self.states:
            st.search.dense.drop_products()


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
                calib_tokens: int | None = None, acceptance: Acceptance | None = None, tau0: float = 0.1,
                progress: bool = True, max_evals: int = 40, noise: Noise | None = None) -> SearchResult:
    """CETT-PPL-p% by the memoised search (see the module's docstring); `band` on the result is the
    crossing of a monotone fit of F(tau) over every evaluation of the whole set, with its interval
    (`noise`); where batches are streamed, the held batches' evaluations give the slopes beyond them."""
    target = check_p(p)
    acceptance = acceptance or Acceptance()
    t0 = time.perf_counter()
    counter = PassCounter(len(batches))
    calib, rest = split_calibration(batches, calib_tokens)
    _say(f"fast search: dense pass on {sum(b.numel() for b in calib)} calibration tokens"
         + (f", {len(rest)} more batches streamed" if rest else ""), progress)
    engine = FastSearch(m, calib, positions, counter, progress=progress)
    history: list[dict] = []
    held: list[Evaluation] = []  # every evaluation of the held batches

    def evaluate(tau: float) -> Evaluation:
        ev = engine.evaluate(tau)
        held.append(ev)
        history.append({**ev.brief(), "batches": len(engine.states)})
        _say(f"  tau={tau:.6f}  ppl_ratio={ev.ppl_ratio:.5f}  activation_ratio={ev.activation_ratio:.4f}",
             progress)
        return ev

    solved = TauSolver(target, acceptance, tau0=tau0, max_evals=max_evals).solve(evaluate)
    evaluations = held
    ev, calib_ev = solved.evaluation, solved.evaluation
    if rest:
        # stream the rest at the calibrated tau; correct tau if the full set disagrees beyond the tolerance
        evaluations = []
        for _ in range(3):
            parts = engine.parts(ev.tau, lockstep=True)
            engine.drop_products()  # room for the streamed batch in flight
            parts += stream(m, rest, ev.tau, positions, counter, detail=True)
            full = combine(ev.tau, parts)
            evaluations.append(full)
            history.append({**full.brief(), "batches": len(batches)})
            _say(f"  all {len(batches)} batches at tau={ev.tau:.6f}: ppl_ratio={full.ppl_ratio:.5f}", progress)
            if (abs(full.ppl_ratio / target - 1) <= max(acceptance.ftol, 2 * acceptance.loose)
                    or full.ppl_ratio <= 1 or calib_ev.ppl_ratio <= 1 or not solved.success):
                break  # close enough, nothing to scale, or calibration failed
            # the full set's ln F is a near-constant multiple of the calibration set's: retarget
            scale = math.log(calib_ev.ppl_ratio) / math.log(full.ppl_ratio)
            solved = TauSolver(math.exp(math.log(target) * scale), acceptance, tau0=ev.tau).solve(evaluate)
            ev = calib_ev = solved.evaluation
        ev = full
    seconds = time.perf_counter() - t0
    return SearchResult("fast", ev.tau, target, ev, history, counter.passes, counter.passes / len(batches),
                        counter.products, seconds, "" if solved.success else solved.message,
                        breakdown=counter.seconds, updated_products=counter.updates, acceptance=acceptance,
                        status=solved.status, band=band(evaluations, target, noise, shape=held if rest else None),
                        evaluations=evaluations)


# --- reference search -----------------------------------------------------------------------------------

def reference_search(m: Model, batches: list[torch.Tensor], p: float, positions: str = "all",
                     tol: float = 1e-6, progress: bool = True, noise: Noise | None = None) -> SearchResult:
    """The authors' procedure, kept deliberately naive (it is the cost the fast search must beat): every
    round a dense pass, each layer's bisection over its 65,536 candidates (`reference_layer_threshold`)
    and a sparse pass with their drop test (`Rule('cett_authors')`); bisection on tau in [0, 1] until the
    bracket is narrower than `tol`; the answer is the final midpoint (lo + hi) / 2, evaluated once more.
    `band` on the result is the monotone fit's crossing over all these evaluations, with its interval."""
    target = check_p(p)
    t0 = time.perf_counter()
    counter = PassCounter(len(batches))
    w = m.w_stack
    history: list[dict] = []
    evaluations: list[Evaluation] = []

    def evaluate(tau: float) -> Evaluation:
        parts = []
        for ids in _bar(batches, f"tau={tau:.7f}", progress):
            dense = run_pass(m, ids, Rule("dense"), positions, capture=True)
            th = torch.tensor([reference_layer_threshold(h, w[i].to(h.dtype), m.norms[i], tau)
                               for i, h in enumerate(dense.dense_h)], device=m.device)
            counter.products += m.n_layers * 16
            r = run_pass(m, ids, Rule("cett_authors", thresholds=th), positions, detail=True)
            counter.passes += 2
            parts.append((replace(dense, dense_h=None), r, th))
            del dense
        ev = combine(tau, parts)
        evaluations.append(ev)
        history.append({**ev.brief(), "batches": len(batches), "lo": lo, "hi": hi})
        _say(f"  [reference] tau={tau:.7f}  ppl_ratio={ev.ppl_ratio:.5f}  "
             f"activation_ratio={ev.activation_ratio:.4f}", progress)
        return ev

    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        tau = (lo + hi) / 2
        if evaluate(tau).ppl_ratio > target:
            hi = tau
        else:
            lo = tau
    ev = evaluate((lo + hi) / 2)
    seconds = time.perf_counter() - t0
    message = ""  # bisection never moved one end: the target lies outside (0, 1)
    if hi == 1.0 and ev.ppl_ratio < target:
        message = f"even tau = {ev.tau:.6f} keeps the PPL ratio at {ev.ppl_ratio:.4f} < target {target:.4f}"
    elif lo == 0.0 and ev.ppl_ratio > target:
        message = f"even tau = {ev.tau:.2e} exceeds the target PPL ratio"
    return SearchResult(f"reference(tol={tol:g})", ev.tau, target, ev, history, counter.passes,
                        counter.passes / len(batches), counter.products, seconds, message,
                        band=band(evaluations, target, noise), evaluations=evaluations)
