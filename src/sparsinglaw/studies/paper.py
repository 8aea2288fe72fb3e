"""The paper's published numbers (arXiv 2411.02335, "Sparsing Law") and the "paper vs this study" table.

One place for every number we compare against; each entry names where in the paper it comes from.
`compare(summary)` turns a study's summary.json into rows: finding, our number with its interval, the
paper's, a verdict (agree / disagree / inconclusive, decided by the rule stated in the row) and a
likely-reason text where they differ. Inconclusive is an honest answer; no verdict is given without an
interval behind it.
"""

from __future__ import annotations

import math
from typing import Any

# Fitted law coefficients (alpha, b, c, A0) per model, from the paper's table of fitted activation-ratio
# laws (ReLU: A = exp(-c D^alpha + b) + A0; SiLU: A = -c D^-alpha + A0; D in billions of tokens).
COEFFICIENTS = {
    ("relu", "0.1B"): dict(alpha=0.101, b=-0.0151, c=3.20, A0=0.0614, params=108.5e6),
    ("relu", "0.2B"): dict(alpha=0.449, b=-3.05, c=0.286, A0=0.0674, params=241.2e6),
    ("relu", "0.4B"): dict(alpha=0.683, b=-3.46, c=0.0790, A0=0.0690, params=452.2e6),
    ("relu", "0.8B"): dict(alpha=1.01, b=-3.49, c=0.00797, A0=0.0721, params=759.7e6),
    ("relu", "1.2B"): dict(alpha=1.33, b=-3.89, c=0.000903, A0=0.0782, params=1181.8e6),
    ("silu", "0.1B"): dict(alpha=0.479, c=0.102, A0=0.409, params=108.5e6),
    ("silu", "0.2B"): dict(alpha=0.844, c=0.208, A0=0.390, params=241.2e6),
    ("silu", "0.4B"): dict(alpha=1.03, c=0.420, A0=0.385, params=452.2e6),
    ("silu", "0.8B"): dict(alpha=0.995, c=0.562, A0=0.383, params=759.7e6),
    ("silu", "1.2B"): dict(alpha=0.967, c=0.538, A0=0.382, params=1181.8e6),
}
SOURCE = {
    "activation": "paper: activation function and training data (ReLU falls, SiLU rises; fitted-law table)",
    "width_depth": "paper: width-depth ratio experiment on the 0.1B family",
    "scale": "paper: parameter scale (limit vs size, convergence vs tokens per parameter)",
    "frequency": "paper: Figure 9 (neuron activation frequency across scales) and its dead-neuron analysis",
    "loss": "paper: ReLU and SiLU reach comparable loss and downstream performance",
}
WIDTH_DEPTH = {"breakpoint": 114.0, "plateau": 0.08, "stable_interval": (74.0, 282.0)}
DEAD_NEURONS_01B_RELU = 0.0035  # fraction of neurons active on < 0.1% of tokens, end of 0.1B ReLU training
SCALE_SPREAD = {"relu": (0.0614, 0.0782), "silu": (0.409, 0.382)}  # A0 at 0.1B -> 1.2B
WEAK_SPREAD = 0.03  # "weakly related": the paper's A0 moves at most 2.7 points over an 11x range of sizes
SIMILAR_LOSS = 0.02  # relative difference of final loss counted as "comparable"


NAME = {"relu": "ReLU", "silu": "SiLU"}
FAR_BEYOND = 10.0  # a forecast more than 10x past the last checkpoint is not read as a number
Z95 = 1.96


def _fmt_ci(v: float | None, ci: list | None, pct: bool = True) -> str:
    if v is None:
        return "n/a"
    f = (lambda x: f"{100 * x:.2f}%") if pct else (lambda x: f"{x:.3g}")
    return f(v) + (f" [{f(ci[0])}, {f(ci[1])}]" if ci and None not in ci else " (no interval)")


def _fmt_a0(f: dict) -> str:
    """A0 with its interval, or why it is not a number: a limit on the fitter's bound is not identified."""
    status = f.get("A0_status", "identified")
    if f.get("A0") is None:
        return "n/a"
    if status == "identified":
        return _fmt_ci(f["A0"], f["A0_ci"])
    ci = f.get("A0_ci")
    return status + (f", interval [{100 * ci[0]:.1f}%, {100 * ci[1]:.1f}%]" if ci and None not in ci else "")


def _row(key: str, finding: str, ours: str, paper: str, verdict: str, reason: str, source: str,
         headline: str = "") -> dict:
    return {"key": key, "finding": finding, "ours": ours, "paper": paper, "verdict": verdict, "reason": reason,
            "source": source, "headline": headline or ours}


def trend_verdict(shape: dict, expected: str) -> str:
    """agree: the whole run moves the expected way with no significant turn back; partly: it moves the
    expected way and then significantly turns back; disagree: it moves the other way; inconclusive:
    start and end are within noise and there is no turn."""
    if shape.get("turn"):
        return "partly"
    if shape["direction"] == expected:
        return "agree"
    return "inconclusive" if shape["direction"] == "flat within noise" else "disagree"


def _combine(verdicts: list[str]) -> str:
    if len(set(verdicts)) == 1:
        return verdicts[0]
    if "disagree" not in verdicts and set(verdicts) & {"agree", "partly"}:
        return "partly"
    return "inconclusive"


def _span(xs: list[float], fmt: str = ".0f") -> str:
    lo, hi = min(xs), max(xs)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}-{hi:{fmt}}"


def _turn_reason(mine: list[dict], expected: str) -> str:
    """The likely reason a curve turns back, as a hypothesis checked against the schedule and epochs."""
    turned = [f for f in mine if f["shape"].get("turn")]
    tpp = [f["shape"]["turn"]["tokens_per_param"] for f in turned if f["shape"]["turn"].get("tokens_per_param")]
    parts = [f"Hypothesis: the tiny scale ({_span([f['non_embedding_params'] / 1e6 for f in mine], '.2f')}M "
             "non-embedding parameters, against the paper's 108M and up) changes the late phase; not tested here."]
    decay = [(f["decay_start_tokens"] / f["non_embedding_params"]) for f in turned if f.get("decay_start_tokens")]
    if decay and tpp:
        when = "after" if min(decay) > max(tpp) else "before" if max(decay) < min(tpp) else "around"
        parts.append(f"The learning-rate decay starts at {_span(decay)} tokens/param, {when} the turns at "
                     f"{_span(tpp)} tokens/param" + (", so it does not explain them." if when == "after" else "."))
    ep = [(f, f["shape"]["turn"]["tokens"] / f["train_tokens"]) for f in turned if f.get("train_tokens")]
    if ep:
        once = [f["name"] for f, _ in ep if (f.get("epochs") or 2) <= 1]
        parts.append(f"Data repetition: the turns come at {_span([e for _, e in ep], '.2f')} epochs"
                     + (f", and {', '.join(once)} turn{'s' if len(once) == 1 else ''} though no token is ever "
                        "repeated, so repetition does not explain them." if once else "."))
    return " ".join(parts)


def _trend_rows(fits: list[dict]) -> list[dict]:
    from sparsinglaw.studies.shape import describe

    rows = []
    for act, word, other, paper_a0 in (("relu", "falls", "rises", "6.1-7.8%"), ("silu", "rises", "falls",
                                                                                "38.2-40.9%")):
        mine = [f for f in fits if f["activation"] == act and f["family"] != "width-depth" and f.get("shape")]
        if not mine:
            continue
        parts, verdicts = [], []
        for f in mine:
            verdicts.append(trend_verdict(f["shape"], word))
            n = f["non_embedding_params"]
            lo, hi = (t / n for t in f["fit_tokens"])
            d = ", ".join(f"ΔAIC vs {k} {x:+.1f}" if x is not None else f"{k} failed"
                          for k, x in f["delta_aic"].items())
            parts.append(f"{f['name']}: {describe(f['shape'])}; {NAME[act]} law on {lo:.0f}-{hi:.0f} "
                         f"tokens/param ({f['n']} points): A0 {_fmt_a0(f)}, {d}")
        verdict = _combine(verdicts)
        turned = [f["shape"]["turn"] for f in mine if f["shape"].get("turn")]
        if verdict == "partly" and turned:
            tpp = [t["tokens_per_param"] for t in turned if t.get("tokens_per_param")]
            after = [abs(t["after"]) for t in turned]
            verb = {"falls": "fall", "rises": "rise"}
            who = "all" if len(turned) == len(mine) else f"{len(turned)} of"
            if all(f["shape"]["direction"] == word for f in mine):
                head = (f"{who} {len(mine)} runs {verb[word]} over the first {_span(tpp)} tokens per parameter, "
                        f"then {verb[other]} again by {_span([100 * a for a in after], '.1f')} points (± "
                        f"{100 * max(t['half_width'] for t in turned):.1f}); over the whole run each still {word} "
                        f"{_span([abs(100 * f['shape']['change']) for f in mine], '.1f')} points")
            else:
                head = f"{who} {len(mine)} runs turn back after {_span(tpp)} tokens per parameter"
            reason = _turn_reason(mine, word)
        else:
            head = "; ".join(f"{f['name']} {f['shape']['direction']} {100 * f['shape']['change']:+.1f} ± "
                             f"{100 * f['shape']['half_width']:.1f} points" for f in mine)
            reason = ("" if verdict == "agree" else "start and end within noise or moving the other way: "
                      "too few tokens per parameter, or the tiny scale")
        if any(f.get("A0_status", "identified") != "identified" for f in mine):
            reason = (reason + " " if reason else "") + (
                "The limit is not identified (A0 at the fitter's bound): the ratio still moves near-linearly in "
                "log D at the end, so 'to a limit' is untested at this budget.")
        if any(f.get("A0_status", "identified") != "identified" for f in mine):
            head += "; the limit A0 is not identified (still moving at the end)"
        rows.append(_row(f"{act}-trend", f"{NAME[act]}: activation ratio {word} with training data",
                         "; ".join(parts), f"{word} monotonically to a limit; A0 {paper_a0} (0.1B-1.2B)", verdict,
                         reason, SOURCE["activation"], head))
    return rows


def _end_ci(f: dict) -> tuple[float, float, float]:
    """The last measured level (mean of the last points) with its 95% interval from the curve's noise."""
    sh = f["shape"]
    half = Z95 * sh["half_width"] / (sh.get("z", 3.0) * math.sqrt(2))  # se of one level, from the difference's
    return sh["end"], sh["end"] - half, sh["end"] + half


def _relu_vs_silu(fits: list[dict]) -> list[dict]:
    rows = []
    by: dict[float, dict] = {}
    for f in fits:
        if f["family"] != "width-depth" and f.get("shape"):
            by.setdefault(f["non_embedding_params"], {})[f["activation"]] = f
    pairs = [(n, d["relu"], d["silu"]) for n, d in sorted(by.items()) if "relu" in d and "silu" in d]
    if not pairs:
        return rows
    ours, heads, verdicts, loss_parts, loss_v = [], [], [], [], []
    for n, r, s in pairs:
        re, rl, rh = _end_ci(r)
        se, sl, sh = _end_ci(s)
        verdicts.append("agree" if rh < sl else "disagree" if rl > sh else "inconclusive")
        ours.append(f"{n / 1e6:.2f}M: final ReLU {100 * re:.2f}% [{100 * rl:.2f}, {100 * rh:.2f}] vs SiLU "
                    f"{100 * se:.2f}% [{100 * sl:.2f}, {100 * sh:.2f}] (ratio {re / se:.2f}); A0 ReLU {_fmt_a0(r)}, "
                    f"SiLU {_fmt_a0(s)}")
        heads.append(f"{n / 1e6:.2f}M {100 * re:.1f}% vs {100 * se:.1f}%")
        if r["final_val_loss"] and s["final_val_loss"]:
            rel = (r["final_val_loss"] - s["final_val_loss"]) / s["final_val_loss"]
            loss_parts.append(f"{n / 1e6:.2f}M: ReLU {r['final_val_loss']:.3f} vs SiLU {s['final_val_loss']:.3f} "
                              f"({100 * rel:+.1f}%)")
            loss_v.append("agree" if abs(rel) <= SIMILAR_LOSS else "disagree")
    v = verdicts[0] if len(set(verdicts)) == 1 else "inconclusive"
    rows.append(_row("relu-vs-silu", "ReLU ends far sparser than SiLU (final measured ratio, 95% interval from "
                     "the curve's noise; A0 where identified)", "; ".join(ours),
                     "ReLU ≈ 7-8% vs SiLU ≈ 38-39% at the end (ratio ≈ 0.2); A0 6-8% vs 38-41%", v,
                     "" if v == "agree" else "intervals overlap: too few tokens or too much noise to separate them",
                     SOURCE["activation"], "final activation ratio ReLU vs SiLU: " + "; ".join(heads)))
    if loss_parts:
        lv = loss_v[0] if len(set(loss_v)) == 1 else "inconclusive"
        rows.append(_row("loss", f"ReLU and SiLU reach comparable loss (within {100 * SIMILAR_LOSS:.0f}%; one run "
                         "each, no interval)", "; ".join(loss_parts), "comparable loss and downstream scores", lv,
                         "" if lv == "agree" else "single runs: seed noise is not measured",
                         SOURCE["loss"]))
    return rows


def _scale_rows(scale: list[dict]) -> list[dict]:
    rows = []
    for act in ("relu", "silu"):
        allpts = [p for p in scale if p["activation"] == act]
        pts = [p for p in allpts if p.get("A0_status", "identified") == "identified"]
        p0, p1 = SCALE_SPREAD[act]
        finding = f"{NAME[act]}: limit A0 only weakly related to size (spread ≤ {100 * WEAK_SPREAD:.0f} points)"
        if len(allpts) >= 2 and len(pts) < 2:
            rows.append(_row(f"{act}-scale", finding, "; ".join(
                f"{p['non_embedding_params'] / 1e6:.2f}M {_fmt_a0(p)}" for p in allpts),
                f"{100 * p0:.1f}% -> {100 * p1:.1f}% from 0.1B to 1.2B", "inconclusive",
                "the limit is not identified at most sizes: the ratio is still moving at the end of the run",
                SOURCE["scale"], "A0 not identified (at the fitter's bound)"))
        if len(pts) < 2:
            continue
        a0 = [p["A0"] for p in pts]
        cis = [p["A0_ci"] for p in pts]
        spread = max(a0) - min(a0)
        have_ci = all(c and None not in c for c in cis)
        # spread of the intervals: the smallest and largest difference between any two sizes
        lo_gap = max(0.0, max(c[0] for c in cis) - min(c[1] for c in cis)) if have_ci else math.nan
        hi_gap = (max(c[1] for c in cis) - min(c[0] for c in cis)) if have_ci else math.nan
        if not have_ci:
            v = "inconclusive"
        elif hi_gap <= WEAK_SPREAD:
            v = "agree"
        elif lo_gap > WEAK_SPREAD:
            v = "disagree"
        else:
            v = "inconclusive"
        rows.append(_row(
            f"{act}-scale", finding,
            "; ".join(f"{p['non_embedding_params'] / 1e6:.2f}M {_fmt_ci(p['A0'], p['A0_ci'])}" for p in pts)
            + f"; spread {100 * spread:.2f} points (interval-supported {100 * lo_gap:.2f}-{100 * hi_gap:.2f})",
            f"{100 * p0:.1f}% -> {100 * p1:.1f}% from 0.1B to 1.2B", v,
            ("" if v == "agree" else ("the limits differ by more than the paper's spread." if v == "disagree" else
                                      "wide A0 intervals: the runs stop before the curve flattens."))
            + (" A0 here is the limit of the phase before the turn (the curves turn back), so it is not the "
               "paper's end-of-training limit." if any(p.get("turned") for p in pts) else ""),
            SOURCE["scale"], f"A0 {_span([100 * x for x in a0], '.1f')}%"
            + (" (of the phase before the turn)" if any(p.get("turned") for p in pts) else "")
            + f" across sizes, spread {100 * lo_gap:.1f}-{100 * hi_gap:.1f} points (interval-supported)"))
    return rows


def convergence_point(f: dict) -> tuple[float | None, list, str]:
    """Tokens per parameter to within 1% of A0 with its interval, or why there is no number: A0 not
    identified, or the forecast more than FAR_BEYOND times past the last checkpoint."""
    n = f["non_embedding_params"]
    if f.get("A0_status", "identified") != "identified":
        return None, [None, None], "not reached within the data (A0 not identified)"
    t = f.get("converged_tokens")
    if t is None:
        return None, [None, None], "no forecast"
    last = (f.get("fit_tokens") or [None, None])[1]
    if last and t > FAR_BEYOND * last:
        return None, [None, None], (f"not reached within the data (forecast {t / last:.3g}x past the last "
                                    "fitted checkpoint)")
    ci = [None if x is None else x / n for x in (f.get("converged_ci") or [None, None])]
    return t / n, ci, f"{t / n:,.0f}" + (f" [{ci[0]:,.0f}, {ci[1]:,.0f}]" if None not in ci else " (interval open)")


def _convergence_rows(fits: list[dict]) -> list[dict]:
    """Smaller models converge faster: tokens per parameter until the curve is within 1% of its limit."""
    rows = []
    for act in ("relu", "silu"):
        pts = sorted((f for f in fits if f["activation"] == act and f["family"] != "width-depth"
                      and f.get("A0") is not None), key=lambda f: f["non_embedding_params"])
        if len(pts) < 2:
            continue
        conv = [(f["name"], *convergence_point(f)) for f in pts]
        small, large = conv[0][2], conv[-1][2]
        if conv[0][1] is None or conv[-1][1] is None:
            v = "inconclusive"
        elif None not in small + large and small[1] < large[0]:
            v = "agree"
        elif None not in small + large and small[0] > large[1]:
            v = "disagree"
        else:
            v = "inconclusive"
        ranged = any(f.get("shape", {}).get("turn") for f in pts)
        rows.append(_row(f"{act}-convergence", f"{NAME[act]}: smaller models converge faster (tokens per "
                         "parameter until within 1% of A0; smallest vs largest interval)",
                         "; ".join(f"{n} {txt}" for n, _, _, txt in conv)
                         + ("; fitted on the phase before the turn" if ranged else ""),
                         "smaller models reach their limit at fewer tokens per parameter", v,
                         "" if v == "agree" else "the limit is not reached or not identified within the data, or "
                         "the intervals overlap", SOURCE["scale"],
                         "; ".join(f"{n} {txt.split(' [')[0]}" for n, _, _, txt in conv)))
    return rows


def _width_depth_rows(wd: dict | None, fits: list[dict]) -> list[dict]:
    if not wd:
        return []
    shapes = [f for f in fits if f["family"] == "width-depth" and f.get("shape")]
    turned = [f["shape"]["turn"] for f in shapes if f["shape"].get("turn")]
    note = ""
    if turned:
        tpp = [t["tokens_per_param"] for t in turned if t.get("tokens_per_param")]
        note = (f" {len(turned)} of {len(shapes)} shapes turn back" + (f" after {_span(tpp)} tokens/param" if tpp
                                                                     else "")
                + ": their A0 is the limit of the phase before the turn, not of the whole run.")
    fit = wd.get("fit")
    if not fit:
        return [_row("width-depth", "Limit ratio rises linearly with d_h/L below a bottleneck",
                     wd.get("message") or "no fit",
                     f"breakpoint ≈ {WIDTH_DEPTH['breakpoint']:.0f}, plateau ≈ 8%", "inconclusive",
                     "too few width-depth shapes finished." + note, SOURCE["width_depth"])]
    p, ci = fit["params"], fit.get("ci", {})
    slope_ci = ci.get("slope")
    if slope_ci and slope_ci[0] > 0:
        v = "agree"
    elif slope_ci and slope_ci[1] < 0:
        v = "disagree"
    else:
        v = "inconclusive"
    rows = [_row("width-depth", "Limit ratio rises linearly with d_h/L below a bottleneck (deeper is sparser)",
                 f"slope {_fmt_ci(p['slope'], slope_ci, pct=False)} per unit d_h/L; breakpoint "
                 f"{_fmt_ci(p['breakpoint'], ci.get('breakpoint'), pct=False)}; plateau "
                 f"{_fmt_ci(p['plateau'], ci.get('plateau'))}",
                 f"rises linearly up to d_h/L ≈ {WIDTH_DEPTH['breakpoint']:.0f}, then ≈ 8%", v,
                 ("" if v == "agree" else "the shapes' limits are too uncertain, or this tiny scale moves the "
                  "bottleneck.") + note, SOURCE["width_depth"])]
    best = wd.get("best_loss_ratio")
    if best is not None:
        lo, hi = WIDTH_DEPTH["stable_interval"]
        rows.append(_row("best-shape",
                         "Best loss at a moderate d_h/L (very deep models train badly); one run per shape",
                         f"lowest final val loss at d_h/L = {best:.3g}",
                         f"stable interval {lo:.0f}-{hi:.0f} at 0.1B", "inconclusive",
                         "a single seed per shape and a 60x smaller model: the stable interval need not "
                         "transfer; read the loss figure", SOURCE["width_depth"]))
    return rows


def _frequency_rows(summary: dict) -> list[dict]:
    dom = summary.get("domains") or {}
    if not dom:
        return []
    dead = {name: d["domains"].get("validation split", {}).get("dead_neuron_ratio") for name, d in dom.items()}
    dead = {k: v for k, v in dead.items() if v is not None}
    rows = []
    if dead:
        worst = max(dead.values())
        v = "agree" if worst <= 0.01 else "disagree" if worst > 0.05 else "inconclusive"
        rows.append(_row("dead-neurons", "Dead neurons (active on < 0.1% of tokens) stay rare at the end of training",
                         "; ".join(f"{k} {100 * x:.2f}%" for k, x in dead.items()),
                         f"{100 * DEAD_NEURONS_01B_RELU:.2f}% (0.1B ReLU)", v,
                         "" if v == "agree" else "small models and short runs: more neurons die or never "
                         "specialise", SOURCE["frequency"]))
    meds = {}
    for name, d in dom.items():
        for dname, m in d["domains"].items():
            q = m.get("frequency_quantiles")
            if q:
                meds.setdefault(dname, {})[name] = q["q50"]
    parts = [f"{dn}: median frequency " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()) for dn, m in meds.items()]
    if parts:
        act = {f["name"]: f["activation"] for f in summary.get("fits") or []}
        by_act: dict[str, list[float]] = {}
        for m in meds.values():
            for k, v in m.items():
                by_act.setdefault(act.get(k, "?"), []).append(v)
        head = "median frequency " + ", ".join(f"{NAME.get(a, a)} {_span(v, '.2f')}" for a, v in by_act.items()) \
            + f" (all sizes, {len(meds)} domains)"
        rows.append(_row("frequency", "Neuron frequency distributions are similar across sizes (read the figure; "
                         "no test statistic)", "; ".join(parts), "scale-insensitive distributions except first/last "
                         "layers", "inconclusive", "shape judged by eye from the figure", SOURCE["frequency"], head))
    return rows


def _coefficient_rows(fits: list[dict]) -> list[dict]:
    rows = []
    for f in fits:
        if f["family"] == "width-depth" or not f["success"]:
            continue
        paper = COEFFICIENTS.get((f["activation"], "0.1B"))
        if paper is None:
            continue
        keys = [k for k in ("alpha", "b", "c", "A0") if k in f["params"]]
        ours = ", ".join(f"{k} {_fmt_ci(f['params'][k], f['ci'].get(k), pct=False)}" for k in keys if k != "A0")
        ours += f", A0 {_fmt_a0(f)}"
        rows.append(_row(f"coefficients-{f['name']}", f"Fitted coefficients, {f['name']} ({f['form']} law)", ours,
                         ", ".join(f"{k} {paper[k]}" for k in keys if k in paper) + " (0.1B)", "inconclusive",
                         "alpha, b, c are not comparable across a 20-100x smaller model and data budget "
                         "(the paper's own fits move a lot with dropped checkpoints); compare A0 and the trend",
                         SOURCE["activation"]))
    return rows


def compare(summary: dict[str, Any]) -> list[dict]:
    """Rows of the "paper vs this study" table from a study summary (see module docstring)."""
    fits = summary.get("fits") or []
    rows = (_trend_rows(fits) + _relu_vs_silu(fits) + _scale_rows(summary.get("scale") or []) + _convergence_rows(fits)
            + _width_depth_rows(summary.get("width_depth"), fits) + _frequency_rows(summary) + _coefficient_rows(fits))
    rows.append(_row("out-of-scope", "CETT gives the lowest PPL at equal sparsity; 2.4B model decodes 4.1x faster",
                     "not tested by a study (see `sparsinglaw tradeoff` and the sparse inference benchmarks)",
                     "CETT best of four metrics; 93.52% limit sparsity at 2.4B", "inconclusive",
                     "outside this command's scope", "paper: metric comparison and acceleration"))
    return rows
