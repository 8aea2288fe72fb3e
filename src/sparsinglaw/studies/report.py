"""DIR/report.html: one self-contained page (no network; every figure inline as a base64 PNG) built only
from what is on disk (summary.json, the PNGs under DIR/fits and DIR/figures, each run's tracking PNGs).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from sparsinglaw.errors import UserError
from sparsinglaw.io import atomic_write_text

CSS = """
body{font:14px/1.45 system-ui,sans-serif;max-width:1180px;margin:24px auto;padding:0 16px;color:#222}
h1{font-size:24px}h2{font-size:19px;margin-top:32px;border-bottom:1px solid #ddd}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0;font-size:12.5px}td,th{border:1px solid #ccc;padding:3px 7px;
vertical-align:top;text-align:left}th{background:#f3f3f3}img{max-width:100%;height:auto}
.grid{display:flex;flex-wrap:wrap;gap:8px}.grid figure{margin:0;width:370px}figcaption{font-size:11px}
.agree{background:#e3f6e3}.disagree{background:#fbe3e3}.inconclusive{background:#fff6d6}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px}.muted{color:#777}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _img(path: Path, alt: str, width: int | None = None) -> str:
    """An <img> with the PNG inline; a visible note (no broken image) if the file is missing."""
    if not path.is_file():
        return f'<p class="muted">({_e(alt)}: no figure)</p>'
    data = base64.b64encode(path.read_bytes()).decode()
    w = f' width="{width}"' if width else ""
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}"{w}>'


def _num(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return format(v, spec)
    return _e(v)


def _pct_ci(v: Any, ci: Any) -> str:
    if v is None:
        return "—"
    s = f"{100 * v:.2f}%"
    if ci and None not in ci:
        s += f" [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"
    return s


def _table(head: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for i, r in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
    return "".join(out) + "</table>"


def build_html(out: Path) -> str:
    s = json.loads((out / "summary.json").read_text())
    plan = s["plan"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(plan['name'])}: sparsing law study"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>Sparsing-law study: {_e(plan['name'])}</h1><p>{_e(plan.get('description', ''))}</p>",
             f"<p>{len(s['finished'])} of {len(plan['runs'])} runs finished"
             + (f"; pending: {_e(', '.join(s['pending']))}" if s["pending"] else "") + ".</p>"]

    parts.append("<h2>Paper vs this study</h2><p>Verdicts follow the rule stated in each finding; every number "
                 "of ours carries its 95% bootstrap interval where one exists.</p>")
    comp = s.get("comparison") or []
    parts.append(_table(["finding", "this study", "paper", "verdict", "likely reason", "paper source"],
                        [[_e(r["finding"]), _e(r["ours"]), _e(r["paper"]), f"<b>{_e(r['verdict'])}</b>",
                          _e(r["reason"]), _e(r["source"])] for r in comp], [r["verdict"] for r in comp]))

    parts.append("<h2>Laws per run</h2>")
    parts.append(_table(
        ["run", "act.", "non-emb params", "d_h/L", "law", "A0 [95% CI]", "trend", "first → last",
         "ΔAIC vs log", "ΔAIC vs sigmoid", "dropped", "τ", "val loss"],
        [[_e(f["name"]), _e(f["activation"]), f"{f['non_embedding_params']:,}", f"{f['width_depth_ratio']:.3g}",
          _e(f["form"]), _pct_ci(f["A0"], f["A0_ci"]), _e(f["trend"]),
          f"{100 * f['first_ratio']:.2f}% → {100 * f['last_ratio']:.2f}%",
          _num(f["delta_aic"].get("log"), "+.1f"), _num(f["delta_aic"].get("sigmoid"), "+.1f"),
          str(f["dropped"]), _num(f["tau"], ".4f"), _num(f["final_val_loss"], ".4f")] for f in s["fits"]]))
    parts.append("<p class='muted'>ΔAIC = AIC(law) − AIC(baseline): negative favours the law. "
                 "Laws: ReLU A = exp(−c·D^α + b) + A0; SiLU A = −c·D^−α + A0 (D in billions of tokens).</p>")
    figs = []
    for f in s["fits"]:
        sub = out / "fits" / f["name"] if len(s["fits"]) > 1 else out / "fits"
        figs.append(f"<figure>{_img(sub / 'fit.png', f['name'] + ' fit')}<figcaption>{_e(f['name'])}: "
                    f"{_e(f['formula'])}; {_e(f['selection'])}</figcaption></figure>")
    parts.append("<div class='grid'>" + "".join(figs) + "</div>")
    for name, cap in (("runs_tokens_per_param.png", "all runs vs tokens per parameter"),
                      ("runs.png", "all runs vs tokens")):
        if (out / "fits" / name).is_file():
            parts.append(f"<h3>{_e(cap)}</h3>" + _img(out / "fits" / name, cap))

    parts.append("<h2>Scale: limits vs non-embedding parameters</h2>")
    parts.append(_table(["run", "activation", "non-emb params", "A0 [95% CI]", "final val loss"],
                        [[_e(r["name"]), _e(r["activation"]), f"{r['non_embedding_params']:,}",
                          _pct_ci(r["A0"], r["A0_ci"]), _num(r["final_val_loss"], ".4f")] for r in s["scale"]]))

    wd = s.get("width_depth")
    if wd:
        parts.append("<h2>Width-depth ratio</h2>")
        fit = wd.get("fit")
        if fit:
            p, ci = fit["params"], fit.get("ci", {})
            parts.append(f"<p>A0 = plateau + slope·min(r − breakpoint, 0): slope {p['slope']:.3g} "
                         f"{_e(ci.get('slope'))}, breakpoint {p['breakpoint']:.3g} {_e(ci.get('breakpoint'))}, "
                         f"plateau {100 * p['plateau']:.2f}%. {_e(fit['message'])}</p>")
        elif wd.get("message"):
            parts.append(f"<p>{_e(wd['message'])}</p>")
        lf = wd.get("loss_fit")
        if lf:
            p, ci = lf["params"], lf["ci"]
            parts.append(f"<p>Final validation loss, same law: slope {p['slope']:.3g} {_e(ci.get('slope'))}, "
                         f"breakpoint {p['breakpoint']:.3g} {_e(ci.get('breakpoint'))}, plateau "
                         f"{p['plateau']:.4f}; lowest loss at d_h/L = {_num(wd.get('best_loss_ratio'), '.3g')}.</p>")
        parts.append(_table(["shape", "d_h/L", "non-emb params", "A0 [95% CI]", "final val loss"],
                            [[_e(p["name"]), f"{p['ratio']:.3g}", f"{p['non_embedding_params']:,}",
                              _pct_ci(p["A0"], p["A0_ci"]), _num(p["final_val_loss"], ".4f")] for p in wd["points"]]))
        parts.append("<div class='grid'>")
        parts.append(f"<figure>{_img(out / 'fits' / 'widthdepth.png', 'width-depth law')}"
                     "<figcaption>limit activation ratio vs d_h/L</figcaption></figure>")
        parts.append(f"<figure>{_img(out / 'figures' / 'width_depth_loss.png', 'loss vs width-depth')}"
                     "<figcaption>final validation loss vs d_h/L</figcaption></figure></div>")

    parts.append("<h2>Neuron activation frequency on two domains</h2><p>Final checkpoint of each run at its "
                 "series' τ: the study's validation split (held-out documents of the training mix) and English "
                 "prose (CPython's pydoc topics; part of the training text when the plan lists the source "
                 "<code>prose</code>). The paper's Figure 9 finds these distributions insensitive to scale.</p>")
    parts.append(_img(out / "figures" / "neuron_frequency_domains.png", "neuron frequency per domain"))
    dom_rows = []
    for name, d in (s.get("domains") or {}).items():
        for dn, m in d["domains"].items():
            dom_rows.append([_e(name), _e(dn), f"{m['tokens']:,}", f"{100 * m['activation_ratio']:.2f}%",
                             _num(m["ppl_ratio"], ".4f"), f"{100 * m['dead_neuron_ratio']:.2f}%"])
    parts.append(_table(["run", "domain", "tokens", "activation ratio", "PPL ratio", "dead neurons"], dom_rows))

    parts.append("<h2>Training: loss, speed</h2>")
    parts.append(_img(out / "figures" / "loss.png", "loss curves"))
    parts.append(_img(out / "figures" / "speed.png", "training speed"))
    parts.append(_table(["run", "tokens", "tokens/param", "epochs", "tokens/s", "MFU", "train s", "track s",
                         "device"],
                        [[_e(r["name"]), f"{r['tokens_trained']:,}", f"{r['tokens_per_param']:.0f}",
                          _num(r.get("epochs"), ".2f"), _num(r.get("tokens_per_s"), ",.0f"),
                          "—" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%",
                          _num(r["times"].get("train_s"), ".0f"), _num(r["times"].get("track_s"), ".0f"),
                          _e(f"{r.get('device')} {r.get('dtype')}")] for r in s["runs"]]))

    parts.append("<h2>Per-run tracking</h2><div class='grid'>")
    for r in s["runs"]:
        parts.append(f"<figure>{_img(out / 'runs' / r['name'] / 'activation_ratio.png', r['name'])}"
                     f"<figcaption>{_e(r['name'])}: activation ratio per checkpoint (one τ)</figcaption></figure>")
    parts.append("</div>")

    d = s["data"]
    parts.append("<h2>Data</h2>")
    parts.append(f"<p>{_num(d.get('train_tokens'), ',')} training tokens, {_num(d.get('val_tokens'), ',')} "
                 f"validation tokens, vocabulary {_num(d.get('vocab_size'))}, {_num(d.get('documents'), ',')} "
                 f"documents after deduplication; at most {_num(d.get('max_epochs'), '.2f')} epochs.</p>")
    total = sum(m.get("train_tokens", 0) for m in d["mix"]) or 1
    parts.append(_table(["source", "documents", "train tokens", "share", "val tokens"],
                        [[_e(m["source"]), f"{m['documents']:,}", f"{m['train_tokens']:,}",
                          f"{100 * m['train_tokens'] / total:.1f}%", f"{m['val_tokens']:,}"] for m in d["mix"]]))
    parts.append("<h2>Plan</h2><pre>" + _e(_plan_text(out)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _plan_text(out: Path) -> str:
    p = out / "plan.toml"
    return p.read_text() if p.is_file() else json.dumps(json.loads((out / "plan.json").read_text()), indent=1)


def comparison_markdown(summary: dict) -> str:
    """The "paper vs this study" table as Markdown (for docs/reproduction.md)."""
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = [f"Study `{summary['plan']['name']}`: {len(summary['finished'])} of {len(summary['plan']['runs'])} "
             "runs finished.", "", "| finding | this study | paper | verdict | likely reason |",
             "|---|---|---|---|---|"]
    lines += [f"| {cell(r['finding'])} | {cell(r['ours'])} | {cell(r['paper'])} | **{r['verdict']}** | "
              f"{cell(r['reason'])} |" for r in summary.get("comparison") or []]
    return "\n".join(lines) + "\n"


def write_report(out: str | Path) -> Path:
    """(Re)build DIR/report.html (and DIR/comparison.md) from DIR/summary.json and the PNGs on disk."""
    out = Path(out)
    if not (out / "summary.json").is_file():
        raise UserError(f"{out} holds no summary.json; run `sparsinglaw study PLAN --out {out}` first "
                        "(a study writes it once a run has finished)")
    path = out / "report.html"
    atomic_write_text(path, build_html(out))
    atomic_write_text(out / "comparison.md", comparison_markdown(json.loads((out / "summary.json").read_text())))
    return path
