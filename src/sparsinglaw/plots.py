"""Every chart in one place, with one look. Functions take plain data and a path and write a PNG."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"cett": "#1f77b4", "topk": "#ff7f0e", "fat": "#2ca02c", "zero": "#d62728",
          "relu": "#d62728", "silu": "#1f77b4", "gelu": "#2ca02c", "relu2": "#9467bd"}


def _figure(width: float = 6.4, height: float = 4.0):
    fig, ax = plt.subplots(figsize=(width, height), dpi=120)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _log_axis(ax, which: str = "x") -> None:
    """A log scale whose tick labels never overlap and are never missing: within a decade, about five
    plain-number ticks; within two, 1-2-5 per decade; wider, at most six powers of ten; minor ticks unlabelled."""
    from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation, LogLocator, MaxNLocator, NullFormatter

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    lo, hi = ax.get_xlim() if which == "x" else ax.get_ylim()
    span = hi / lo if lo > 0 else float("inf")
    if span < 10:
        axis.set_major_locator(MaxNLocator(nbins=5))
        axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.3g}"))
    else:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if span < 100 else (1.0,), numticks=6))
        axis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False))
    axis.set_minor_locator(LogLocator(base=10, subs="auto", numticks=12))
    axis.set_minor_formatter(NullFormatter())


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --- measurement ------------------------------------------------------------------------------------

def layer_ratios(meas, path: str | os.PathLike) -> Path:
    """Per-layer activation ratio of one measurement, with the model mean as a dashed line."""
    fig, ax = _figure()
    idx = [layer["index"] for layer in meas.layers]
    ratio = [layer["activation_ratio"] for layer in meas.layers]
    ax.bar(idx, ratio, color=COLORS.get(meas.metric if meas.metric != "ppl" else "cett", "#1f77b4"))
    ax.axhline(meas.activation_ratio, color="k", ls="--", lw=1, label=f"mean {meas.activation_ratio:.3f}")
    ax.set_xlabel("layer")
    ax.set_ylabel("activation ratio")
    tau = f", tau {meas.cett:.4g}" if meas.cett is not None and meas.metric == "ppl" else ""
    ax.set_title(f"{meas.model}: {meas.label}{tau}, PPL ratio {meas.ppl_ratio:.4f}", fontsize=10)
    ax.legend()
    return _save(fig, path)


def _finish(fig, ax, path: str | os.PathLike, *, xlabel: str, ylabel: str, title: str, xlog: bool = False,
            ylog: bool = False, title_size: float | None = None) -> Path:
    """Axis scales, labels, title and legend of a line chart, then save it."""
    if xlog:
        _log_axis(ax, "x")
    if ylog:
        _log_axis(ax, "y")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, **({"fontsize": title_size} if title_size else {}))
    ax.legend(fontsize=8)
    return _save(fig, path)


def _layer_heatmap(data, *, xlabel: str, title: str, width: float = 8.0, **imshow) -> tuple:
    """Rows are layers: the one look of every layer x something activation-ratio map."""
    fig, ax = _figure(width, 4.0)
    ax.grid(False)
    im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest", **imshow)
    fig.colorbar(im, ax=ax, label="activation ratio")
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    return fig, ax


def token_heatmap(meas, path: str | os.PathLike) -> Path:
    """Layer x token activation ratio of the first evaluated sequence."""
    import numpy as np

    fig, _ = _layer_heatmap(np.asarray(meas.token_ratio), xlabel="token position", vmin=0,
                            title=f"{meas.model}: per-token activation ratio, {meas.label}")
    return _save(fig, path)


def neuron_frequency(meas, path: str | os.PathLike) -> Path:
    """Distribution of neuron activation frequencies (times kept / tokens), all layers pooled."""
    fig, ax = _figure()
    ax.hist(meas.neuron_frequency.ravel(), bins=50, range=(0, 1), color="#555555")
    _log_axis(ax, "y")
    ax.set_xlabel("activation frequency (kept / tokens)")
    ax.set_ylabel("neurons")
    ax.set_title(f"{meas.model}: neuron activation frequency, {meas.label}; dead (<0.1%) "
                 f"{100 * meas.dead_neuron_ratio:.2f}% of neurons", fontsize=9)
    return _save(fig, path)


def tradeoff(tr, path: str | os.PathLike, near: tuple[float, float] = (1.0, 1.1)) -> Path:
    """PPL ratio versus activation ratio of the four metrics (the paper's Figure 2): the whole sweep on a log
    axis, and beside it the region near the target (PPL ratio 1.0-1.1, linear) where the metrics are compared."""
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.2), dpi=120)
    sweeps = []
    for metric in ("cett", "topk", "fat", "zero"):
        pts = sorted((p["activation_ratio"], p["ppl_ratio"]) for p in tr.points if p["metric"] == metric)
        vals = [p["value"] for p in tr.points if p["metric"] == metric]
        if not pts:
            continue
        name = {"cett": "CETT", "topk": "Top-k", "fat": "FAT-eps", "zero": "zero"}[metric]
        param = {"cett": "tau", "topk": "k", "fat": "eps"}.get(metric)
        if param:
            sweeps.append(f"{name} {param} {min(vals):.3g}-{max(vals):.3g}")
        for ax in axes:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "o-" if len(pts) > 1 else "s", color=COLORS[metric], label=name, ms=4)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.axhline(1.01, color="k", ls=":", lw=1, label="+1% PPL")
        ax.set_xlabel("activation ratio")
    axes[0].set_ylabel("PPL ratio (sparse / dense)")
    _log_axis(axes[0], "y")
    axes[0].set_title("whole sweep", fontsize=9)
    axes[1].set_ylim(*near)
    axes[1].set_title(f"near the target (PPL ratio {near[0]:g}-{near[1]:g})", fontsize=9)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{tr.model}: PPL vs activation ratio ({'; '.join(sweeps)}; Top-k pooled)", fontsize=9)
    return _save(fig, path)


# --- laws: fitted curves, linearised view, several runs, width-depth ---------------------------


def _law_color(name: str | None, i: int = 0) -> str:
    key = (name or "").lower()
    if key in COLORS:
        return COLORS[key]
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return cycle[i % len(cycle)]


def plot_law_fit(D, A, used, band: dict, path: str | os.PathLike, *, title: str = "", label: str = "fit",
                 color: str | None = None, xlabel: str = "training tokens (billions)",
                 others: list[dict] | None = None) -> Path:
    """Data (dropped points hollow) with the fitted curve, its confidence band and the prediction band;
    `others` ({label, D, curve}): further curves drawn dashed, e.g. a baseline that fits better."""
    import numpy as np

    D, A, used = np.asarray(D), np.asarray(A), np.asarray(used, dtype=bool)
    color = color or _law_color(label)
    fig, ax = _figure()
    if band.get("pred_lo"):
        ax.fill_between(band["D"], band["pred_lo"], band["pred_hi"], color=color, alpha=0.12,
                        label=f"{100 * band.get('level', 0.95):.0f}% prediction band")
    if band.get("conf_lo"):
        ax.fill_between(band["D"], band["conf_lo"], band["conf_hi"], color=color, alpha=0.3,
                        label=f"{100 * band.get('level', 0.95):.0f}% confidence band")
    if band.get("curve"):
        ax.plot(band["D"], band["curve"], color=color, lw=1.8, label=label)
    for i, o in enumerate(others or []):
        ax.plot(o["D"], o["curve"], ls="--", lw=1.5, color=_law_color(o["label"].split()[0], i + 1),
                label=o["label"])
    ax.plot(D[used], A[used], "o", ms=3.5, color="black", label="data")
    if (~used).any():
        ax.plot(D[~used], A[~used], "o", ms=4.5, mfc="none", color="gray", label="dropped")
    return _finish(fig, ax, path, xlabel=xlabel, ylabel="activation ratio", title=title, xlog=True)


def plot_linearised(x, y, x_line, y_line, form: str, path: str | os.PathLike, *, title: str = "") -> Path:
    """The law's straight-line view: ReLU ln(b - ln(A - A0)) vs ln D, SiLU ln(A0 - A) vs ln D."""
    ylabel = "ln(b − ln(A − A0))" if form == "relu" else "ln(A0 − A)"
    fig, ax = _figure()
    ax.plot(x, y, "o", ms=3.5, color="black", label="data")
    sign = "+" if form == "relu" else "−"
    ax.plot(x_line, y_line, color=_law_color(form), lw=1.8, label=f"{form} law (slope {sign}α)")
    return _finish(fig, ax, path, xlabel="ln D (D in billions of tokens)", ylabel=ylabel, title=title)


def plot_law_runs(runs: list[dict], path: str | os.PathLike, *, xlabel: str = "training tokens (billions)",
                  title: str = "") -> Path:
    """Several curves on one chart: each run is {name, x, A, used, x_curve, curve, lo, hi, A0}."""
    import numpy as np

    fig, ax = _figure(7.2, 4.4)
    for i, r in enumerate(runs):
        c = _law_color(None, i)
        x, A, used = np.asarray(r["x"]), np.asarray(r["A"]), np.asarray(r["used"], dtype=bool)
        ax.plot(x[used], A[used], "o", ms=3, color=c)
        if (~used).any():
            ax.plot(x[~used], A[~used], "o", ms=4, mfc="none", color=c)
        if r.get("curve") is not None:
            if r.get("lo") is not None:
                ax.fill_between(r["x_curve"], r["lo"], r["hi"], color=c, alpha=0.15)
            lab = r["name"] + (f" (A0 = {100 * r['A0']:.2f}%)" if r.get("A0") is not None else "")
            ax.plot(r["x_curve"], r["curve"], color=c, lw=1.6, label=lab)
        else:
            ax.plot([], [], "o", color=c, label=r["name"] + " (no fit)")
    return _finish(fig, ax, path, xlabel=xlabel, ylabel="activation ratio", title=title, xlog=True)


def plot_width_depth(ratio, limit_ratio, band: dict, breakpoint: float, path: str | os.PathLike, *,
                     breakpoint_ci: list[float] | None = None, names: list[str] | None = None,
                     title: str = "") -> Path:
    """Limit activation ratio vs width-depth ratio d_h/L with the linear-then-flat fit and its breakpoint."""
    fig, ax = _figure()
    if breakpoint_ci:
        ax.axvspan(breakpoint_ci[0], breakpoint_ci[1], color="gray", alpha=0.15, label="breakpoint interval")
    if band.get("conf_lo"):
        ax.fill_between(band["ratio"], band["conf_lo"], band["conf_hi"], color=COLORS["relu"], alpha=0.2)
    ax.plot(band["ratio"], band["curve"], color=COLORS["relu"], lw=1.8, label="linear then flat")
    ax.axvline(breakpoint, color="gray", ls="--", lw=1, label=f"breakpoint {breakpoint:.0f}")
    ax.plot(ratio, limit_ratio, "o", color="black", ms=4, label="limit ratio A0")
    for r, a, n in zip(ratio, limit_ratio, names or [], strict=False):
        if n:
            ax.annotate(n, (r, a), fontsize=6, xytext=(3, 3), textcoords="offset points")
    return _finish(fig, ax, path, xlabel="width-depth ratio d_h / L (linear axis: the law is two straight pieces)",
                   ylabel="limit activation ratio", title=title)


# --- tracking: one run's checkpoints at one tau --------------------------------------------------


def _track_title(series: dict, what: str) -> str:
    return (f"{series.get('name', 'run')} ({series.get('activation') or '?'}): {what}, "
            f"{series.get('metric', 'CETT')} at one tau {series['tau']:.4f}")


def track_activation_ratio(series: dict, path: str | os.PathLike) -> Path:
    """Activation ratio (CETT-PPL-p% at the run's one tau) versus training tokens; calibration points marked."""
    fig, ax = _figure()
    color = _law_color(series.get("activation"))
    tokens, ratio = series["tokens"], series["activation_ratio"]
    ax.plot(tokens, ratio, "o-", ms=3.5, color=color, label=series.get("metric", "activation ratio"))
    calib = set(series.get("calibration", {}).get("checkpoints", []))
    pts = [(t, a) for t, a, ck in zip(tokens, ratio, series["checkpoints"]) if ck["name"] in calib]
    if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, "s", ms=7, mfc="none", color="black", label="calibration checkpoints")
    return _finish(fig, ax, path, xlabel="training tokens", ylabel="activation ratio",
                   title=_track_title(series, "activation ratio"), xlog=True, title_size=10)


def track_layer_heatmap(series: dict, path: str | os.PathLike) -> Path:
    """Per-layer activation ratio (rows: layers) over checkpoints (columns), at the run's one tau."""
    import numpy as np

    data = np.asarray(series["layer_ratio"], dtype=float).T  # (L, checkpoints)
    fig, ax = _layer_heatmap(data, xlabel="checkpoint (training tokens)", width=7.2, origin="lower",
                             title=_track_title(series, "per-layer activation ratio"))
    n = data.shape[1]
    ticks = sorted({0, n - 1, *range(0, n, max(1, n // 8))})
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{series['tokens'][i]:.2g}" for i in ticks], rotation=45, fontsize=7)
    return _save(fig, path)


def track_dead_neurons(series: dict, path: str | os.PathLike) -> Path:
    """Fraction of neurons active on under 0.1% of validation tokens, versus training tokens."""
    fig, ax = _figure()
    ax.plot(series["tokens"], series["dead_neuron_ratio"], "o-", ms=3.5, color="#555555")
    _log_axis(ax, "x")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("dead-neuron ratio (active on < 0.1% of tokens)")
    ax.set_title(_track_title(series, "dead neurons"), fontsize=10)
    return _save(fig, path)


def track_frequency(series: dict, path: str | os.PathLike) -> Path:
    """Neuron activation-frequency histograms of the first and the last checkpoint, all layers pooled."""
    import numpy as np

    fig, ax = _figure()
    hists = series["frequency_histogram"]
    for i, color in ((0, "#aaaaaa"), (len(hists) - 1, _law_color(series.get("activation")))):
        h = hists[i]
        if not h:
            continue
        edges = np.asarray(h["edges"])
        ax.stairs(h["counts"], edges, color=color, lw=1.5, fill=i == 0, alpha=0.6 if i == 0 else 1.0,
                  label=f"{series['checkpoints'][i]['name']} ({series['tokens'][i]:.3g} tokens)")
    return _finish(fig, ax, path, xlabel="activation frequency (kept / tokens)", ylabel="neurons",
                   title=_track_title(series, "neuron activation frequency"), ylog=True, title_size=10)


# --- compare: several measurements on one chart -----------------------------------------------------------


def compare_layers(series: list[dict], path: str | os.PathLike) -> Path:
    """Per-layer activation ratio of several measurements; x is the relative depth when layer counts differ."""
    fig, ax = _figure(7.2, 4.4)
    counts = {len(s["layer_ratio"]) for s in series}
    relative = len(counts) > 1
    for i, s in enumerate(series):
        n = len(s["layer_ratio"])
        xs = [j / max(1, n - 1) for j in range(n)] if relative else list(range(n))
        color = _law_color(None, i)
        ax.plot(xs, s["layer_ratio"], "o-", ms=3, color=color, label=s["label"])
        if s.get("mean") is not None:
            ax.axhline(s["mean"], color=color, ls="--", lw=0.8)
    return _finish(fig, ax, path, xlabel="relative depth (layer / last layer)" if relative else "layer",
                   ylabel="activation ratio", title="activation ratio per layer (dashed: model mean)",
                   title_size=10)


def compare_frequency(series: list[dict], path: str | os.PathLike) -> Path:
    """Neuron activation-frequency distributions (fraction of neurons per bin), all layers pooled."""
    import numpy as np

    fig, ax = _figure(7.2, 4.4)
    for i, s in enumerate(series):
        h = s["histogram"]
        if not h:
            ax.plot([], [], color=_law_color(None, i), label=s["label"] + " (no histogram)")
            continue
        counts = np.asarray(h["counts"], dtype=float)
        ax.stairs(counts / max(1.0, counts.sum()), np.asarray(h["edges"]), color=_law_color(None, i), lw=1.5,
                  label=s["label"])
    return _finish(fig, ax, path, xlabel="activation frequency (kept / tokens)", ylabel="fraction of neurons",
                   title="neuron activation frequency, all layers pooled", ylog=True, title_size=10)
