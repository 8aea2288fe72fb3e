"""Several measurements side by side: a table of the headline numbers and overlaid per-layer and
neuron-frequency charts (what a user does after measuring two models, or one model two ways)."""

from __future__ import annotations

import json
from pathlib import Path

from sparsinglaw.errors import UserError
from sparsinglaw.io import atomic_write_json

FILES = ("compare.json", "layer_ratio.png", "neuron_frequency.png")
HEADLINE = ("model", "activation", "metric", "params", "tokens", "ppl_dense", "ppl_ratio", "activation_ratio",
            "sparsity", "cett", "dead_neuron_ratio", "reached", "zero_aware_activation_ratio")


def load(paths: list[str | Path], names: list[str] | None = None) -> list[dict]:
    """Each path's measurement.json (a measurement folder, or the file itself) with a unique `name`."""
    if len(paths) < 2:
        raise UserError("compare needs two or more measurement folders (written by `sparsinglaw measure`)")
    if names is not None and len(names) != len(paths):
        raise UserError(f"--names gives {len(names)} labels for {len(paths)} folders; give one per folder")
    rows = []
    for i, p in enumerate(paths):
        p = Path(p)
        f = p / "measurement.json" if p.is_dir() else p
        if not f.is_file():
            raise UserError(f"{p} has no measurement.json; give folders written by `sparsinglaw measure --out`")
        try:
            meas = json.loads(f.read_text())
            meas["layers"], meas["metric"]  # noqa: B018 - the fields every row needs
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{f} is not a measurement written by `sparsinglaw measure` ({e})") from None
        meas["name"] = names[i] if names else (f.parent.name if f.name == "measurement.json" else f.stem)
        rows.append(meas)
    seen: dict[str, int] = {}
    for r in rows:  # two folders of the same name (a/out, b/out): number them
        seen[r["name"]] = seen.get(r["name"], 0) + 1
        if seen[r["name"]] > 1:
            r["name"] = f"{r['name']} ({seen[r['name']]})"
    return rows


def _label(r: dict) -> str:
    from sparsinglaw.measure import metric_label

    return metric_label(r["metric"], r.get("params") or {}) + (" (static)" if r.get("regime") == "static" else "")


def table(rows: list[dict]) -> str:
    """One line per measurement: the numbers a reader compares first."""
    def num(v, fmt):
        return "-" if v is None or v != v else format(v, fmt)

    head = (f"{'name':<20} {'model':<28} {'act.':<5} {'metric':<26} {'tokens':>8} {'PPL dense':>9} "
            f"{'PPL ratio':>9} {'act. ratio':>10} {'tau':>8} {'dead':>7}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['name'][:20]:<20} {str(r.get('model'))[:28]:<28} {str(r.get('activation'))[:5]:<5} "
                     f"{_label(r)[:26]:<26} {r.get('tokens', 0):>8} {num(r.get('ppl_dense'), '.3f'):>9} "
                     f"{num(r.get('ppl_ratio'), '.5f'):>9} {num(r.get('activation_ratio'), '.4f'):>10} "
                     f"{num(r.get('cett'), '.5f'):>8} {num(r.get('dead_neuron_ratio'), '.4f'):>7}")
        if r.get("reached") is False:
            lines.append(f"{'':<20} target not reached: {r.get('search', {}).get('message', '')}")
        if r.get("zero_aware_activation_ratio") is not None:
            lines.append(f"{'':<20} zero-aware activation ratio {r['zero_aware_activation_ratio']:.4f} "
                         "(the pooled Top-k cut is 0 in some layers)")
    return "\n".join(lines)


def save(rows: list[dict], out: str | Path) -> list[Path]:
    """compare.json (the headline numbers of each) and the two overlaid charts."""
    from sparsinglaw import plots

    out = Path(out)
    atomic_write_json(out / "compare.json", {"measurements": [
        {"name": r["name"], "label": _label(r), **{k: r.get(k) for k in HEADLINE}} for r in rows]})
    series = [{"name": r["name"], "label": f"{r['name']}: {r.get('model')}, {_label(r)}",
               "layer_ratio": [layer["activation_ratio"] for layer in r["layers"]],
               "mean": r.get("activation_ratio"), "histogram": r.get("frequency_histogram") or {}} for r in rows]
    return [out / "compare.json", plots.compare_layers(series, out / "layer_ratio.png"),
            plots.compare_frequency(series, out / "neuron_frequency.png")]
