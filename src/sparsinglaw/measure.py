"""One measurement: passes over data with a metric -> a `Measurement` (to_json, save with plots).

Also `tradeoff`: PPL versus activation ratio for the four metrics on the same data (paper Figure 2).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sparsinglaw import search as search_mod
from sparsinglaw.backend import current
from sparsinglaw.errors import UserError
from sparsinglaw.io import atomic_write_json
from sparsinglaw.sites import activation_name, hooked
from sparsinglaw.sparse import Model, Rule, Thresholds, run_pass
from sparsinglaw.uncertainty import Noise, f_sigma

METRICS = ("zero", "topk", "fat", "cett", "ppl")
FILES = ("measurement.json", "thresholds.json", "layer_ratio.png", "heatmap.png", "neuron_frequency.png")
DEAD_FREQUENCY = 0.001  # a neuron active on under 0.1% of tokens counts as dead, as in the paper


@dataclass
class Measurement:
    """Result of `measure`. Ratios are fractions; `sparsity` = 1 - activation_ratio.

    For CETT-PPL-p% the headline `activation_ratio` (and `cett`, its tau) is where a monotone fit of the
    PPL ratio over every evaluation of the search crosses the target (`uncertainty.band`), with
    `activation_ratio_interval` and `tau_interval`: the band whose PPL ratio is consistent with the target.
    `ppl_ratio`, `layers` and the exported thresholds are those of the search's evaluated answer
    (`search['evaluated']`). `ppl_ratio_sigma`: the noise of the PPL ratio (bootstrap over token blocks).
    """

    model: str
    activation: str
    metric: str
    params: dict
    tokens: int
    positions: str
    batches: int
    ppl_dense: float
    ppl_sparse: float
    ppl_ratio: float  # mean over batches of exp(loss_sparse - loss_dense) (the authors' aggregation)
    ppl_ratio_pooled: float  # exp(mean loss_sparse - mean loss_dense)
    activation_ratio: float
    cett: float | None
    layers: list[dict]
    search: dict | None
    timings: dict
    dead_neuron_ratio: float
    frequency_histogram: dict
    static: dict | None = None
    regime: str = "per-batch"
    reached: bool = True  # False: the CETT-PPL-p% search did not reach its target (search["message"] says why)
    zero_aware_activation_ratio: float | None = None  # pooled Top-k whose cut is 0: exact zeros not counted
    notes: list[str] = field(default_factory=list)  # what a reader must know to trust the numbers
    ppl_ratio_sigma: float | None = None
    activation_ratio_interval: tuple[float, float] | None = None
    tau_interval: tuple[float, float] | None = None
    uncertainty: dict | None = None  # the band in full (level, resamples, width, tokens to narrow it, ...)
    band_notes: list[str] = field(default_factory=list, repr=False)
    backend: dict = field(default_factory=dict)  # the `Backend` it ran under
    thresholds: Thresholds | None = field(default=None, repr=False)
    token_ratio: list[list[float]] | None = field(default=None, repr=False)
    neuron_frequency: np.ndarray | None = field(default=None, repr=False)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.activation_ratio

    @property
    def label(self) -> str:
        """The metric as the paper writes it, for titles and summaries: CETT-PPL-1%, CETT (tau 0.2),
        Top-k (k 0.3, pooled), FAT-eps (eps 0.01), zero; '(static)' for exported thresholds re-applied."""
        return metric_label(self.metric, self.params) + (" (static)" if self.regime == "static" else "")

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("thresholds", "token_ratio", "neuron_frequency", "band_notes"):
            d.pop(k)
        d["sparsity"] = self.sparsity
        d["heatmap_sample"] = self.token_ratio
        return d

    def save(self, out: str | Path) -> list[Path]:
        """measurement.json, thresholds.json (when the metric has static thresholds) and plots."""
        return self.write(out) + self.plot(out)

    def write(self, out: str | Path) -> list[Path]:
        """measurement.json and thresholds.json (when the metric has static thresholds)."""
        out = Path(out)
        atomic_write_json(out / "measurement.json", self.to_json())
        files = [out / "measurement.json"]
        if self.thresholds is not None:
            self.thresholds.save(out / "thresholds.json")
            files.append(out / "thresholds.json")
        return files

    def plot(self, out: str | Path) -> list[Path]:
        """layer_ratio.png, heatmap.png and neuron_frequency.png (where the data exists)."""
        from sparsinglaw import plots

        out = Path(out)
        files = [plots.layer_ratios(self, out / "layer_ratio.png")]
        if self.token_ratio is not None:
            files.append(plots.token_heatmap(self, out / "heatmap.png"))
        if self.neuron_frequency is not None:
            files.append(plots.neuron_frequency(self, out / "neuron_frequency.png"))
        return files

    def summary(self) -> str:
        lines = [f"model {self.model} ({self.activation}), {self.tokens} tokens ({self.positions} positions), "
                 f"{self.batches} batches, {self.label}",
                 f"  dense PPL {self.ppl_dense:.3f}  sparse PPL {self.ppl_sparse:.3f}  "
                 f"PPL ratio {self.ppl_ratio:.5f}",
                 f"  activation ratio {self.activation_ratio:.4f}"
                 + (f" [{self.activation_ratio_interval[0]:.4f}, {self.activation_ratio_interval[1]:.4f}]"
                    if self.activation_ratio_interval else "")
                 + f"  (sparsity {100 * self.sparsity:.2f}%)"
                 + (f"  tau {self.cett:.5f}" if self.cett is not None else "")
                 + (f" [{self.tau_interval[0]:.5f}, {self.tau_interval[1]:.5f}]" if self.tau_interval else "")]
        lines += ["  " + note for note in self.band_notes]
        if self.search and self.search.get("evaluated") and self.activation_ratio_interval:
            e = self.search["evaluated"]
            lines.append(f"  the search's evaluated answer: tau {e['tau']:.5f}, activation ratio "
                         f"{e['activation_ratio']:.4f}, PPL ratio {e['ppl_ratio']:.5f}")
        if self.static:
            lines.append(f"  static thresholds on the same data: PPL ratio {self.static['ppl_ratio']:.5f}, "
                         f"activation ratio {self.static['activation_ratio']:.4f}")
        if self.search:
            lines.append(f"  search {self.search['method']}: {self.search['evaluations']} evaluations, "
                         f"{self.search['full_passes']:.1f} passes over the data, {self.search['seconds']:.1f} s")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def target_line(self) -> str:
        """The target and how closely it was met, for the closing line ('' for metrics without a target)."""
        if not self.search:
            return ""
        target = self.search["target_ppl_ratio"]
        off = abs(self.ppl_ratio / target - 1)
        if not self.reached:
            return f"target PPL ratio {target:.5g} NOT reached (best {self.ppl_ratio:.5f})"
        return (f"target PPL ratio {target:.5g}, reached {self.ppl_ratio:.5f} (off by {100 * off:.3f}%; "
                f"accepted within {self.search['accepted']})")


def metric_label(metric: str, params: dict) -> str:
    """A metric and its parameter as the paper writes them (parameters missing from `params` are left out)."""
    p = params
    if metric == "ppl" and "p" in p:
        return f"CETT-PPL-{p['p']:g}%"
    if metric == "cett" and "tau" in p:
        return f"CETT (tau {p['tau']:g})"
    if metric == "topk" and "k" in p:
        return f"Top-k (k {p['k']:g}, {p.get('mode', 'pooled')})"
    if metric == "fat" and "eps" in p:
        return f"FAT-eps (eps {p['eps']:g})"
    return {"ppl": "CETT-PPL", "cett": "CETT", "topk": "Top-k", "fat": "FAT-eps"}.get(metric, metric)


def _check_params(metric: str, p: float | None, tau: float | None, k: float | None, eps: float | None) -> None:
    if metric not in METRICS:
        raise UserError(f"unknown --metric {metric!r}; use one of {', '.join(METRICS)}")
    if metric == "ppl":
        search_mod.check_p(p if p is not None else 1.0)
    if metric == "cett" and (tau is None or not 0 <= tau <= 1):
        raise UserError(f"--tau must be in [0, 1] for --metric cett (got {tau})")
    if metric == "topk" and (k is None or not 0 < k <= 1):
        raise UserError(f"--k must be in (0, 1] for --metric topk (got {k})")
    if metric == "fat" and (eps is None or not eps >= 0 or not math.isfinite(eps)):
        raise UserError(f"--eps must be a finite number >= 0 for --metric fat (got {eps})")


def _passes(m: Model, batches: list[torch.Tensor], rule: Rule, positions: str, progress: bool, label: str):
    """Dense and sparse pass of every batch under a fixed rule; per-batch (dense loss, result, None)."""
    parts = []
    for ids in tqdm(batches, desc=label, disable=not progress, file=sys.stderr, leave=False):
        dense = run_pass(m, ids, Rule("dense"), positions)
        parts.append((dense, run_pass(m, ids, rule, positions, detail=True), torch.zeros(m.n_layers)))
    return parts


def measure(model: torch.nn.Module, batches: list[torch.Tensor], metric: str = "ppl", *, p: float = 1.0,
            tau: float | None = None, k: float | None = None, eps: float | None = None,
            topk_mode: str = "pooled", search: str = "fast", tol: float = 1e-6, positions: str = "all",
            calib_tokens: int | None = None, thresholds: Thresholds | None = None, static_check: bool = True,
            name: str = "", progress: bool = True, noise: Noise | None = None) -> Measurement:
    """Measure activation sparsity of `model` on token `batches` with one of the paper's metrics.

    metric: zero | topk (k, topk_mode pooled|per-token) | fat (eps) | cett (tau) | ppl (CETT-PPL-p%).
    With `thresholds` (a frozen thresholds.json), the static regime is evaluated instead.
    `noise`: how the noise of the PPL ratio is estimated and the CETT-PPL-p% band drawn.
    """
    if not batches:
        raise UserError("no evaluation batches; pass more text or fewer --tokens")
    t0 = time.perf_counter()
    m = Model(model)
    search_json = None
    cett_tau = None
    zero_aware, notes = None, []
    regime = "per-batch"
    static_th: Thresholds | None = None
    found = None
    if thresholds is not None:
        if len(thresholds.thresholds) != m.n_layers:
            raise UserError(f"thresholds have {len(thresholds.thresholds)} layers, the model has {m.n_layers}")
        regime, metric = "static", thresholds.metric or thresholds.kind
        params = dict(thresholds.params)
        ev = search_mod.combine(float("nan"), _passes(m, batches, thresholds.rule(m.device), positions,
                                                      progress, "static"))
        static_check = False
    else:
        _check_params(metric, p, tau, k, eps)
        if metric == "ppl":
            params = {"p": p}
            if search == "fast":
                res = search_mod.fast_search(m, batches, p, positions, calib_tokens=calib_tokens, progress=progress,
                                             noise=noise)
            elif search == "reference":
                res = search_mod.reference_search(m, batches, p, positions, tol=tol, progress=progress, noise=noise)
            else:
                raise UserError(f"unknown --search {search!r}; use fast or reference")
            ev, search_json, cett_tau, found = res.evaluation, res.to_json(), res.tau, res.band
            search_json["accepted"] = _accepted(res, search, tol)
        elif metric == "cett":
            params = {"tau": tau}
            counter = search_mod.PassCounter(len(batches))
            ev = search_mod.combine(tau, search_mod.stream(m, batches, tau, positions, counter, detail=True))
            cett_tau = tau
        else:
            rule, params = _rule_for(metric, k, eps, topk_mode)
            parts = _passes(m, batches, rule, positions, progress, metric)
            ev = search_mod.combine(float("nan"), parts)
            static_th = _static_for(metric, rule, m.n_layers, eps)
            if rule.kind == "topk_pooled":
                zero_aware, notes = _topk_zero_cut(m, batches, rule, parts, positions, progress)
    if cett_tau is not None:
        th = ev.thresholds.mean(0).tolist()
        static_th = Thresholds("cett", th, params={**params, "tau": cett_tau})
    if static_th is not None:
        static_th.model, static_th.metric = name, metric
    t_static = time.perf_counter()
    static = (_static_check(m, batches, static_th, cett_tau, positions, progress)
              if static_check and static_th is not None and cett_tau is not None else None)
    t_static = time.perf_counter() - t_static
    out = _finish(m, ev, name, metric, params, positions, len(batches), cett_tau, search_json, static, regime,
                  static_th, time.perf_counter() - t0)
    out.timings["static_check_s"] = t_static
    out.reached = not (search_json and search_json.get("message"))
    out.zero_aware_activation_ratio, out.notes = zero_aware, notes
    if not out.reached:
        out.notes.append(f"{out.label} not reached: {search_json['message']}")
    out.ppl_ratio_sigma = f_sigma(ev, noise)
    if found is not None:
        out.activation_ratio, out.cett = found.activation_ratio, found.tau
        out.activation_ratio_interval, out.tau_interval = found.activation_ratio_interval, found.tau_interval
        out.uncertainty = {**found.to_json(), **(noise or Noise()).to_json()}
        out.band_notes = found.notes()
    return out


def _rule_for(metric: str, k: float | None, eps: float | None, topk_mode: str) -> tuple[Rule, dict]:
    """The keep rule of a one-pass metric (zero, fat, topk) and its parameters as recorded."""
    if metric == "zero":
        return Rule("zero"), {}
    if metric == "fat":
        return Rule("fat", value=eps), {"eps": eps}
    if topk_mode not in ("pooled", "per-token"):
        raise UserError(f"unknown --topk-mode {topk_mode!r}; use pooled or per-token")
    rule = Rule("topk_pooled" if topk_mode == "pooled" else "topk_token", value=k, recorded={})
    return rule, {"k": k, "mode": topk_mode}


def _static_check(m: Model, batches, static_th: Thresholds, tau: float, positions: str, progress: bool) -> dict:
    """The exported thresholds (their mean over batches) re-applied to the same data: what thresholds.json
    gives when frozen."""
    if progress:
        print("[static check] re-applying the exported per-layer thresholds (their mean over batches) to the "
              "same data: what thresholds.json gives when frozen", file=sys.stderr, flush=True)
    sev = search_mod.combine(tau, _passes(m, batches, static_th.rule(m.device), positions, progress, "static check"))
    return {"ppl_ratio": sev.ppl_ratio, "activation_ratio": sev.activation_ratio}


def _accepted(res, search: str, tol: float) -> str:
    """The tolerance the search accepted its answer within, in words (for the closing line and the JSON)."""
    if search == "reference":
        return f"tau bisected to {tol:g}"
    acc = res.acceptance
    loose = acc.loose * acc.widen(res.evaluation.tokens)
    return f"{100 * loose:.3g}% of the PPL ratio (its sampling noise on {res.evaluation.tokens} tokens)"


def _topk_zero_cut(m: Model, batches, rule: Rule, parts, positions: str, progress: bool
                   ) -> tuple[float | None, list[str]]:
    """Pooled Top-k keeps |s| >= cut; where the cut is 0 (more than the kept fraction of s is exactly 0, as
    on ReLU models) it counts exact zeros as active. The authors' count stays the headline; this gives the
    zero-aware ratio beside it (those layer-batches counted as `--metric zero` does) and a note."""
    cuts = torch.stack([torch.stack([c.float().cpu() for c in rule.recorded[i]]) for i in range(m.n_layers)]).T
    zero = cuts <= 0  # (batches, layers)
    if not bool(zero.any()):
        return None, []
    zparts = _passes(m, batches, Rule("zero"), positions, progress, "zero-aware count")
    kept = torch.stack([torch.where(zero[b], zr.kept.cpu(), r.kept.cpu())
                        for b, ((_, r, _), (_, zr, _)) in enumerate(zip(parts, zparts))]).sum(0)
    tokens = sum(r.tokens for _, r, _ in parts)
    ratio = float((kept / (tokens * m.d_ff)).mean())
    layers = sorted({int(i) for i in zero.nonzero()[:, 1]})
    note = (f"the pooled Top-k cut is 0 in {int(zero.sum())} of {zero.numel()} layer-batches (layers "
            f"{', '.join(map(str, layers))}): exact zeros count as active there, as in the authors' code; "
            f"not counting them, the activation ratio is {ratio:.4f}")
    return ratio, [note]


def _static_for(metric: str, rule: Rule, n_layers: int, eps: float | None) -> Thresholds | None:
    """Static (frozen) thresholds on |s| for the activation-based metrics, where they exist."""
    if metric == "zero":
        return Thresholds("abs", [float(torch.finfo(torch.float32).tiny)] * n_layers)
    if metric == "fat":
        return Thresholds("abs", [float(eps)] * n_layers, params={"eps": eps})
    if rule.kind == "topk_pooled" and rule.recorded:
        return Thresholds("abs", [float(torch.stack(rule.recorded[i]).float().mean()) for i in range(n_layers)],
                          params={"k": rule.value, "mode": "pooled"})
    return None  # per-token top-k has no per-layer threshold


def _finish(m: Model, ev, name, metric, params, positions, n_batches, cett_tau, search_json, static, regime,
            static_th, seconds) -> Measurement:
    layer_ratio = ev.layer_ratio.tolist()
    th = static_th.thresholds if static_th is not None else [None] * m.n_layers
    freq = (ev.neuron_kept / ev.tokens).numpy() if ev.neuron_kept is not None else None
    layers = [{"index": i, "threshold": th[i], "activation_ratio": layer_ratio[i]} for i in range(m.n_layers)]
    if freq is not None:
        for i, row in enumerate(freq):
            layers[i]["dead_neuron_ratio"] = float((row < DEAD_FREQUENCY).mean())
        counts, edges = np.histogram(freq.ravel(), bins=50, range=(0.0, 1.0))
        hist = {"edges": edges.tolist(), "counts": counts.tolist()}
        dead = float((freq < DEAD_FREQUENCY).mean())
    else:
        hist, dead = {}, float("nan")
    return Measurement(
        model=name, activation=activation_name(m.model), metric=metric, params=params, tokens=ev.tokens,
        positions=positions, batches=n_batches, ppl_dense=math.exp(ev.loss_dense), ppl_sparse=math.exp(ev.loss_sparse),
        ppl_ratio=ev.ppl_ratio, ppl_ratio_pooled=math.exp(ev.loss_sparse - ev.loss_dense),
        activation_ratio=ev.activation_ratio, cett=cett_tau, layers=layers, search=search_json,
        timings={"total_s": seconds}, dead_neuron_ratio=dead, frequency_histogram=hist, static=static,
        regime=regime, backend=current().to_json(), thresholds=static_th,
        token_ratio=ev.token_ratio.tolist() if ev.token_ratio is not None else None, neuron_frequency=freq)


# --- tradeoff: PPL versus activation ratio of the four metrics ------------------------------------------

TAUS = (0.01, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.45, 0.6)
KEEP = (0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.45, 0.6, 0.8)


@dataclass
class Tradeoff:
    model: str
    activation: str
    tokens: int
    ppl_dense: float
    points: list[dict]  # {metric, param, value, activation_ratio, ppl_ratio}
    timings: dict
    backend: dict = field(default_factory=dict)  # the `Backend` it ran under

    def to_json(self) -> dict:
        return asdict(self)

    def save(self, out: str | Path) -> list[Path]:
        from sparsinglaw import plots

        out = Path(out)
        atomic_write_json(out / "tradeoff.json", self.to_json())
        return [out / "tradeoff.json", plots.tradeoff(self, out / "tradeoff.png")]


TRADEOFF_FILES = ("tradeoff.json", "tradeoff.png")


def _fat_eps(m: Model, ids: torch.Tensor, keep: tuple[float, ...]) -> list[float]:
    """FAT's eps values that keep about the given fractions of neurons, from one batch's dense |s|."""
    samples: list[torch.Tensor] = []

    def fn(_i: int, _h: torch.Tensor, s: torch.Tensor) -> None:
        flat = s.detach().abs().flatten().float()
        samples.append(flat[:: max(1, flat.numel() // 200_000)])

    with torch.no_grad(), hooked(m.sites, fn, need_s=True):
        m.model(input_ids=ids.to(m.device))
    pooled = torch.cat(samples)
    return [float(torch.quantile(pooled[:2**24], 1 - q)) for q in keep]


def tradeoff(model: torch.nn.Module, batches: list[torch.Tensor], *, taus=TAUS, keep=KEEP, positions: str = "all",
             name: str = "", progress: bool = True) -> Tradeoff:
    """Every metric over a sweep of its parameter on the same batches; CETT in the per-batch regime.

    Memory is one batch's dense intermediates at a time: each batch is measured at every point, then freed.
    """
    if not batches:
        raise UserError("no evaluation batches; pass more text or fewer --tokens")
    t0 = time.perf_counter()
    m = Model(model)
    eps_values = _fat_eps(m, batches[0], keep)
    rules = ([("cett", "tau", t, None) for t in taus]
             + [("topk", "k", k, Rule("topk_pooled", value=k)) for k in keep]
             + [("fat", "eps", e, Rule("fat", value=e)) for e in eps_values]
             + [("zero", "", 0.0, Rule("zero"))])
    acc: dict[int, list] = {j: [] for j in range(len(rules))}
    counter = search_mod.PassCounter(len(batches))
    dense_losses = []
    bar = tqdm(total=len(batches) * len(rules), desc="tradeoff points", disable=not progress, file=sys.stderr,
               unit="point")
    for b, ids in enumerate(batches):
        engine = search_mod.FastSearch(m, [ids], positions, counter)
        (dense,) = engine.dense_passes
        dense_losses.append(dense.loss)
        for j, (metric, _, value, rule) in enumerate(rules):
            bar.set_postfix_str(f"batch {b + 1}/{len(batches)}, {metric} {value:.3g}", refresh=False)
            use = rule if rule is not None else Rule("cett", thresholds=engine.thresholds(value)[0])
            acc[j].append((dense, run_pass(m, ids, use, positions), torch.zeros(m.n_layers)))
            bar.update()
        del engine
    bar.close()
    points = []
    for j, (metric, pname, value, _rule) in enumerate(rules):
        ev = search_mod.combine(value, acc[j])
        points.append({"metric": metric, "param": pname, "value": value, "activation_ratio": ev.activation_ratio,
                       "ppl_ratio": ev.ppl_ratio})
    return Tradeoff(model=name, activation=activation_name(model), tokens=sum(b.numel() for b in batches),
                    ppl_dense=math.exp(sum(dense_losses) / len(dense_losses)), points=points,
                    timings={"total_s": time.perf_counter() - t0}, backend=current().to_json())
