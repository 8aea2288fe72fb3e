"""Fits and tables of a study from what is on disk: DIR/fits/ (per-run law fits, scale table, width-depth),
DIR/figures/ (loss curves, speed, neuron frequency per domain) and DIR/summary.json.

Every number the report shows comes from summary.json, so `sparsinglaw report DIR` can rebuild the page
without refitting; `analyse` refits from the runs' series.json (cheap: bootstrap is batched).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsinglaw.io import atomic_write_json, staged_dir
from sparsinglaw.studies.runner import RUN_DONE

BOOTSTRAP = 1000
SUMMARY_FILE = "summary.json"


def finished_runs(out: Path) -> list[dict]:
    """run.json, series.json and domains.json of every finished run, in plan order."""
    plan = json.loads((out / "plan.json").read_text())
    runs = []
    for spec in plan["runs"]:
        d = out / "runs" / spec["name"]
        if not (d / RUN_DONE).is_file():
            continue
        rec = json.loads((d / RUN_DONE).read_text())
        rec["series_path"] = str(d / "series.json")
        rec["series"] = json.loads((d / "series.json").read_text())
        rec["domains"] = json.loads((d / "domains.json").read_text()) if (d / "domains.json").is_file() else None
        runs.append(rec)
    return runs


def _fit_row(ft: Any, run: dict) -> dict:
    """One run's law: form, parameters with intervals, the baselines' ΔAIC, A0, trend direction."""
    from sparsinglaw.laws import BASELINE_FORMS, LAW_FORMS

    fj = ft.to_json()
    base = {k: v for k, v in fj["baselines"].items() if k in BASELINE_FORMS}
    d_aic = {k: (fj["aic"] - v["aic"]) if (v.get("success") and fj["aic"] is not None and v["aic"] is not None)
             else None for k, v in base.items()}
    A = ft.series.activation_ratio
    a0 = fj["params"].get("A0") if ft.success and ft.form in LAW_FORMS else None
    return {"name": run["name"], "activation": run["spec"]["activation"], "family": run["spec"].get("family"),
            "non_embedding_params": run["spec"]["non_embedding_params"], "width": run["spec"]["d_model"],
            "depth": run["spec"]["n_layers"], "width_depth_ratio": run["spec"]["d_model"] / run["spec"]["n_layers"],
            "form": ft.form, "selection": ft.selection, "success": ft.success, "message": ft.message,
            "formula": fj["formula"], "params": fj["params"], "ci": fj["ci"], "aic": fj["aic"],
            # ΔAIC = AIC(law) − AIC(baseline): negative means the law is preferred
            "delta_aic": d_aic, "best_by_aic": ft.best_by_aic, "A0": a0, "A0_ci": fj["ci"].get("A0"),
            "trend": "falls" if ft.form == "relu" else "rises", "first_ratio": float(A[0]),
            "last_ratio": float(A[-1]), "dropped": len(ft.dropped), "n": fj["n"], "warnings": ft.warnings,
            "final_val_loss": run.get("final_val_loss"), "tau": run["series"]["tau"],
            # the paper's convergence view: tokens until the fitted curve is within 1% of its limit
            "converged_tokens": (ft.forecast.get("converged") or {}).get("tokens"),
            "converged_ci": (ft.forecast.get("converged") or {}).get("interval")}


def analyse(out: str | Path, log: Callable[[str], Any] = print) -> dict:
    """Fit every finished run, build the tables and figures, write DIR/summary.json and DIR/report.html."""
    from sparsinglaw import laws
    from sparsinglaw.studies import figures
    from sparsinglaw.studies.report import write_report

    out = Path(out)
    plan = json.loads((out / "plan.json").read_text())
    runs = finished_runs(out)
    series = [laws.load_series(r["series_path"]) for r in runs]
    laws.unique_names(series)
    fits = [laws.fit_series(s, auto_drop=True, bootstrap=BOOTSTRAP, seed=0) for s in series]
    wd = None
    wd_runs = [(r, ft) for r, ft in zip(runs, fits) if r["spec"].get("family") == "width-depth"]
    wd_message = ""
    if wd_runs:
        try:
            wd = laws.width_depth_from_fits([ft for _, ft in wd_runs], bootstrap=BOOTSTRAP)
        except Exception as e:  # noqa: BLE001 - too few shapes yet is data, not a failure of the study
            wd_message = str(e)
    with staged_dir(out / "fits") as stage:
        laws.save_fits(fits, stage)
        if wd is not None:
            laws.save_width_depth(wd, stage)
    wd_summary = width_depth_summary(wd, wd_runs, wd_message)
    with staged_dir(out / "figures") as stage:
        figs = figures.write_all(runs, wd_runs, stage, (wd_summary or {}).get("loss_fit"))
    corpus = json.loads((out / "corpus.json").read_text()) if (out / "corpus.json").is_file() else {}
    rows = [_fit_row(ft, r) for r, ft in zip(runs, fits)]
    summary = {
        "plan": plan, "finished": [r["name"] for r in runs],
        "pending": [r["name"] for r in plan["runs"] if r["name"] not in {x["name"] for x in runs}],
        "data": data_summary(corpus, runs),
        "runs": [{k: v for k, v in r.items() if k not in ("series", "series_path", "domains")} for r in runs],
        "fits": rows,
        "scale": scale_rows(rows),
        "width_depth": wd_summary,
        "domains": {r["name"]: r["domains"] for r in runs if r.get("domains")},
        "figures": {k: Path(v).name for k, v in figs.items()},
    }
    from sparsinglaw.studies.paper import compare

    summary["comparison"] = compare(summary)
    atomic_write_json(out / SUMMARY_FILE, summary)
    write_report(out)
    log(f"fitted {len(fits)} run(s); wrote {out / SUMMARY_FILE} and {out / 'report.html'}")
    return summary


def data_summary(corpus: dict, runs: list[dict]) -> dict:
    """Tokens, domain mix (per source) and epochs (tokens trained / train tokens) of the study."""
    train = corpus.get("train_tokens")
    return {"corpus": corpus.get("path"), "train_tokens": train, "val_tokens": corpus.get("val_tokens"),
            "vocab_size": corpus.get("vocab_size"), "documents": corpus.get("documents"),
            "mix": corpus.get("sources_mix") or [],
            "epochs": {r["name"]: r.get("epochs") for r in runs},
            "max_epochs": max((r.get("epochs") or 0 for r in runs), default=None)}


def scale_rows(rows: list[dict]) -> list[dict]:
    """Limits versus size per activation (the width-depth family left out: its shapes share one size)."""
    out = [r for r in rows if r["family"] != "width-depth" and r["A0"] is not None]
    return sorted(({k: r[k] for k in ("name", "activation", "non_embedding_params", "A0", "A0_ci",
                                      "final_val_loss", "width_depth_ratio")} for r in out),
                  key=lambda r: (r["activation"], r["non_embedding_params"]))


def width_depth_summary(wd: Any, wd_runs: list, message: str) -> dict | None:
    if not wd_runs:
        return None
    pts = sorted(({"name": r["name"], "width": r["spec"]["d_model"], "depth": r["spec"]["n_layers"],
                   "ratio": r["spec"]["d_model"] / r["spec"]["n_layers"],
                   "non_embedding_params": r["spec"]["non_embedding_params"],
                   "A0": ft.params.get("A0") if ft.success else None, "A0_ci": ft.fit.ci.get("A0"),
                   "final_val_loss": r.get("final_val_loss")} for r, ft in wd_runs), key=lambda p: p["ratio"])
    losses = [p for p in pts if p["final_val_loss"] is not None and math.isfinite(p["final_val_loss"])]
    best = min(losses, key=lambda p: p["final_val_loss"]) if losses else None
    return {"points": pts, "fit": wd.to_json() if wd is not None else None, "message": message,
            "best_loss_ratio": best["ratio"] if best else None, "loss_fit": loss_hinge(losses)}


def loss_hinge(points: list[dict]) -> dict | None:
    """The same linear-then-flat law fitted to the final validation loss against d_h/L (the paper: very
    deep models train worse, then loss is flat). The law is fitted to loss / s with s = 2 x max loss (the
    fitter takes fractions); slope, plateau and their intervals are scaled back, the breakpoint is not."""
    from sparsinglaw.laws import fit_width_depth

    if len({p["ratio"] for p in points}) < 4:
        return None
    scale = 2 * max(p["final_val_loss"] for p in points)
    ft = fit_width_depth([p["ratio"] for p in points], [p["final_val_loss"] / scale for p in points],
                         names=[p["name"] for p in points], bootstrap=BOOTSTRAP)
    back = {"slope": scale, "plateau": scale, "breakpoint": 1.0}
    return {"formula": "loss = plateau + slope*min(r - breakpoint, 0), r = d_h/L",
            "params": {k: v * back[k] for k, v in ft.params.items()},
            "ci": {k: [x * back[k] for x in v] for k, v in ft.ci.items()},
            "ratio": ft.ratio, "curve_ratio": ft.band.get("ratio", []),
            "curve": [c * scale for c in ft.band.get("curve", [])]}
