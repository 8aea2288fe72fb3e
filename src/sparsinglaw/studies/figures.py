"""The study's own charts (the law fits come from sparsinglaw.laws): loss curves, training speed, neuron
activation frequency per size on two text domains (the paper's Figure 9), loss versus width-depth ratio.
Same look as sparsinglaw.plots (its figure and save helpers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sparsinglaw.plots import _figure, _finish, _law_color, _save


def write_all(runs: list[dict], wd_runs: list, folder: Path, loss_fit: dict | None = None) -> dict[str, Path]:
    """Every study figure that the finished runs support; {key: path}."""
    figs: dict[str, Path] = {}
    if runs:
        figs["loss"] = loss_curves(runs, folder / "loss.png")
        figs["speed"] = speed(runs, folder / "speed.png")
        if any(r.get("domains") for r in runs):
            figs["frequency"] = neuron_frequency(runs, folder / "neuron_frequency_domains.png")
    if len(wd_runs) >= 2:
        figs["width_depth_loss"] = width_depth_loss([r for r, _ in wd_runs], folder / "width_depth_loss.png",
                                                    loss_fit)
    return figs


def _label(run: dict) -> str:
    s = run["spec"]
    return f"{run['name']} ({s['non_embedding_params'] / 1e6:.2f}M)"


def loss_curves(runs: list[dict], path: Path) -> Path:
    """Training loss (lines) and validation loss at checkpoints (dots) against tokens per parameter."""
    fig, ax = _figure(7.2, 4.4)
    for i, r in enumerate(runs):
        n = r["spec"]["non_embedding_params"]
        color = _run_color(r, i)
        lc = r.get("loss_curve") or []
        if lc:
            ax.plot([p["tokens"] / n for p in lc], [p["loss"] for p in lc], color=color, lw=1, alpha=0.8,
                    label=_label(r))
        vc = r.get("val_curve") or []
        if vc:
            ax.plot([p["tokens"] / n for p in vc], [p["val_loss"] for p in vc], "o", color=color, ms=3)
    return _finish(fig, ax, path, xlabel="tokens per non-embedding parameter", ylabel="loss (nats/token)",
                   title="training loss (lines) and validation loss (dots)", xlog=True)


def _run_color(run: dict, i: int) -> str:
    import matplotlib

    if run["spec"].get("family") == "width-depth":
        return matplotlib.colormaps["viridis"](i / 8 % 1.0)
    shades = {0: 1.0, 1: 0.7, 2: 0.45, 3: 0.3}
    base = matplotlib.colors.to_rgb(_law_color(run["spec"]["activation"]))
    rank = i % 4
    return tuple(1 - (1 - c) * shades[rank] for c in base)  # lighter for later sizes of the same activation


def speed(runs: list[dict], path: Path) -> Path:
    """Median training throughput per run (bars) with MFU written on each bar where known."""
    fig, ax = _figure(7.2, 0.35 * len(runs) + 1.6)
    names = [r["name"] for r in runs]
    tps = [r.get("tokens_per_s") or 0 for r in runs]
    y = np.arange(len(runs))
    ax.barh(y, tps, color=[_law_color(r["spec"]["activation"]) for r in runs], alpha=0.8)
    for yi, r in zip(y, runs):
        mfu = r.get("mfu")
        txt = f"{(r.get('tokens_per_s') or 0):,.0f} tok/s" + (f", MFU {100 * mfu:.1f}%" if mfu else "")
        ax.text((r.get("tokens_per_s") or 0), yi, " " + txt, va="center", fontsize=7)
    ax.set_yticks(y, names, fontsize=7)
    ax.set_xlim(0, max(tps + [1]) * 1.45)
    ax.invert_yaxis()
    ax.set_xlabel("training tokens per second (median over logged windows)")
    ax.set_title(f"training speed ({runs[0].get('device')}, {runs[0].get('dtype')})")
    return _save(fig, path)


def neuron_frequency(runs: list[dict], path: Path) -> Path:
    """Distribution of per-neuron activation frequency (all layers pooled) at the end of training, one
    panel per text domain, one line per run (Figure 9 of the paper: the shape barely depends on size)."""
    import matplotlib.pyplot as plt

    domains = sorted({d for r in runs if r.get("domains") for d in r["domains"]["domains"]})
    fig, axes = plt.subplots(1, len(domains), figsize=(5.2 * len(domains), 3.8), dpi=120, squeeze=False)
    for ax, dom in zip(axes[0], domains):
        ax.grid(True, alpha=0.3)
        for i, r in enumerate(runs):
            d = (r.get("domains") or {}).get("domains", {}).get(dom)
            if not d or not d.get("frequency_histogram"):
                continue
            h = d["frequency_histogram"]
            counts = np.asarray(h["counts"], dtype=float)
            ax.stairs(counts / max(counts.sum(), 1), np.asarray(h["edges"]), color=_run_color(r, i), lw=1.4,
                      label=f"{_label(r)}, A={d['activation_ratio']:.3f}")
        ax.set_yscale("log")
        ax.set_xlabel("activation frequency (times active / tokens)")
        ax.set_ylabel("fraction of neurons")
        ax.set_title(f"neuron activation frequency: {dom}", fontsize=10)
        ax.legend(fontsize=6)
    return _save(fig, path)


def width_depth_loss(runs: list[dict], path: Path, fit: dict | None = None) -> Path:
    """Final validation loss against the width-depth ratio d_h/L (log axis) for the width-depth family,
    with the fitted linear-then-flat curve and its breakpoint when there is one."""
    fig, ax = _figure()
    if fit and fit.get("curve"):
        bp = fit["params"]["breakpoint"]
        ax.plot(fit["curve_ratio"], fit["curve"], color="#555555", lw=1, label=f"hinge fit, breakpoint {bp:.3g}")
        ax.axvline(bp, color="#555555", ls=":", lw=1)
    pts = sorted((r["spec"]["d_model"] / r["spec"]["n_layers"], r.get("final_val_loss"), r["name"])
                  for r in runs if r.get("final_val_loss") is not None)
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=_law_color("relu"), label="final val loss")
        for x, yv, name in pts:
            ax.annotate(name, (x, yv), fontsize=6, xytext=(3, 3), textcoords="offset points")
    return _finish(fig, ax, path, xlabel="width-depth ratio d_h / L", ylabel="validation loss",
                   title="loss vs width-depth ratio (equal non-embedding parameters)", xlog=True)
