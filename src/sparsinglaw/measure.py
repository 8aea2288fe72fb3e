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

METRICS = ("zero", "topk", "fat", "cett", "ppl")
DEAD_FREQUENCY = 0.001  # a neuron active on under 0.1% of tokens counts as dead, as in the paper


@dataclass
class Measurement:
    """Result of `measure`. Ratios are fractions; `sparsity` = 1 - activation_ratio."""

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
        for k in ("thresholds", "token_ratio", "neuron_frequency"):
            d.pop(k)
        d["sparsity"] = self.sparsity
        d["heatmap_sample"] = self.token_ratio
        return d

    def save(self, out: str | Path) -> list[Path]:
        """measurement.json, thresholds.json (when the metric has static thresholds) and plots."""
        from sparsinglaw import plots

        out = Path(out)
        atomic_write_json(out / "measurement.json", self.to_json())
        files = [out / "measurement.json"]
        if self.thresholds is not None:
            self.thresholds.save(out / "thresholds.json")
            files.append(out / "thresholds.json")
        files.append(plots.layer_ratios(self, out / "layer_ratio.png"))
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
                 f"  activation ratio {self.activation_ratio:.4f}  (sparsity {100 * self.sparsity:.2f}%)"
                 + (f"  tau {self.cett:.5f}" if self.cett is not None else "")]
        if self.static:
            lines.append(f"  static thresholds on the same data: PPL ratio {self.static['ppl_ratio']:.5f}, "
                         f"activation ratio {self.static['activation_ratio']:.4f}")
        if self.search:
            lines.append(f"  search {self.search['method']}: {self.search['evaluations']} evaluations, "
                         f"{self.search['full_passes']:.1f} passes over the data, {self.search['seconds']:.1f} s")
        return "\n".join(lines)


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
        parts.append((dense.loss, run_pass(m, ids, rule, positions, detail=True), torch.zeros(m.n_layers)))
    return parts


def measure(model: torch.nn.Module, batches: list[torch.Tensor], metric: str = "ppl", *, p: float = 1.0,
            tau: float | None = None, k: float | None = None, eps: float | None = None,
            topk_mode: str = "pooled", search: str = "fast", tol: float = 1e-6, positions: str = "all",
            calib_tokens: int | None = None, thresholds: Thresholds | None = None, static_check: bool = True,
            name: str = "", progress: bool = True) -> Measurement:
    """Measure activation sparsity of `model` on token `batches` with one of the paper's metrics.

    metric: zero | topk (k, topk_mode pooled|per-token) | fat (eps) | cett (tau) | ppl (CETT-PPL-p%).
    With `thresholds` (a frozen thresholds.json), the static regime is evaluated instead.
    """
    if not batches:
        raise UserError("no evaluation batches; pass more text or fewer --tokens")
    t0 = time.perf_counter()
    m = Model(model)
    search_json = None
    cett_tau = None
    regime = "per-batch"
    static_th: Thresholds | None = None
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
                res = search_mod.fast_search(m, batches, p, positions, calib_tokens=calib_tokens, progress=progress)
            elif search == "reference":
                res = search_mod.reference_search(m, batches, p, positions, tol=tol, progress=progress)
            else:
                raise UserError(f"unknown --search {search!r}; use fast or reference")
            ev, search_json, cett_tau = res.evaluation, res.to_json(), res.tau
        elif metric == "cett":
            params = {"tau": tau}
            counter = search_mod.PassCounter(len(batches))
            ev = search_mod.combine(tau, search_mod.stream(m, batches, tau, positions, counter, detail=True))
            cett_tau = tau
        else:
            if metric == "zero":
                rule, params = Rule("zero"), {}
            elif metric == "fat":
                rule, params = Rule("fat", value=eps), {"eps": eps}
            elif topk_mode in ("pooled", "per-token"):
                rule = Rule("topk_pooled" if topk_mode == "pooled" else "topk_token", value=k, recorded={})
                params = {"k": k, "mode": topk_mode}
            else:
                raise UserError(f"unknown --topk-mode {topk_mode!r}; use pooled or per-token")
            ev = search_mod.combine(float("nan"), _passes(m, batches, rule, positions, progress, metric))
            static_th = _static_for(metric, rule, m.n_layers, eps)
    if cett_tau is not None:
        th = ev.thresholds.mean(0).tolist()
        static_th = Thresholds("cett", th, params={**params, "tau": cett_tau})
    if static_th is not None:
        static_th.model, static_th.metric = name, metric
    static = None
    if static_check and static_th is not None and cett_tau is not None:
        sev = search_mod.combine(cett_tau, _passes(m, batches, static_th.rule(m.device), positions, progress,
                                                    "static check"))
        static = {"ppl_ratio": sev.ppl_ratio, "activation_ratio": sev.activation_ratio}
    return _finish(m, ev, name, metric, params, positions, len(batches), cett_tau, search_json, static, regime,
                   static_th, time.perf_counter() - t0)


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
    for ids in tqdm(batches, desc="tradeoff", disable=not progress, file=sys.stderr):
        st = search_mod.BatchState(m, ids, positions, counter)
        dense_losses.append(st.loss_dense)
        for j, (_metric, _, value, rule) in enumerate(rules):
            use = rule if rule is not None else Rule("cett", thresholds=st.search.thresholds(value))
            acc[j].append((st.loss_dense, run_pass(m, ids, use, positions), torch.zeros(m.n_layers)))
        del st
    points = []
    for j, (metric, pname, value, _rule) in enumerate(rules):
        ev = search_mod.combine(value, acc[j])
        points.append({"metric": metric, "param": pname, "value": value, "activation_ratio": ev.activation_ratio,
                       "ppl_ratio": ev.ppl_ratio})
    return Tradeoff(model=name, activation=activation_name(model), tokens=sum(b.numel() for b in batches),
                    ppl_dense=math.exp(sum(dense_losses) / len(dense_losses)), points=points,
                    timings={"total_s": time.perf_counter() - t0}, backend=current().to_json())
