"""Masked products per CETT threshold search (`metrics.ThresholdSearch`) on real activations, replaying
the fast search's pattern: for each tau of a sequence, batch 0 without a hint, then batch i with batch
i-1's thresholds at that tau as the hint, every batch's search memoised across the sequence's taus.

The count depends on the shape of CETT(threshold) near the answer and on how alike batches are, so the
data are SmolLM2-135M's dense FFN intermediates on the default text (CPython prose), 4 batches of
4 x 2048 tokens, every 5th layer (masked products of all 30 layers take too long on a CPU). The tau
sequences are those of real fast searches (on the H200, and this CPU's SmolLM2 measurement).

  python benchmarks/dev/threshold_probes.py          # table + benchmarks/results/dev/threshold_probes.json
  python benchmarks/threshold_probes.py --against /tmp/metrics_orig.py   # also an older metrics.py:
                                        # both tables, and its thresholds must equal the current ones
  python benchmarks/threshold_probes.py --cache /tmp/probes.pt   # keep the dense intermediates (1.3 GB)

On 2 CPU cores: about 3 minutes of dense passes, then 1 (current only) to 4 (with --against) of products.

CETT values are memoised per (batch, layer, threshold) inside one run (the sequences share their first
tau): products are counted as the search asks for them, and every implementation sees the same values.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import statistics
import time
from collections import Counter
from pathlib import Path
from types import ModuleType

import torch

from sparsinglaw import metrics

# tau sequences of real fast searches: on the H200 (0.1B trained, twice; 1.2B random and trained) and this
# CPU's SmolLM2 (results/measure_speed_*.json)
SEQUENCES = {
    "h200-0.1b": [0.1, 0.10144907760788219],
    "h200-0.1b-flash": [0.1, 0.10176811068936262, 0.10082932530921809],
    "h200-1.2b-random": [0.1, 0.14484275800534813, 0.13232573250518745],
    "h200-1.2b-trained": [0.1, 0.05876783218090796, 0.03477002573142709],
    "cpu-smollm2": [0.1, 0.029630650980070224, 0.04172786603564835, 0.0409516228192525],
}


GUARD = -1  # the search's threshold 0 where the reference wraps to its top candidate


class Counted:
    """Stands in for a DenseLayers in a ThresholdSearch: counts masked products per layer and steps
    (calls), serves CETT from a memo shared by all replays, and hands out a grid computed once."""

    def __init__(self, dense: metrics.DenseLayers, grid: torch.Tensor, memo: dict):
        self.dense, self.grid, self.memo = dense, grid, memo
        self.n_layers = dense.n_layers
        self.products = [0] * self.n_layers
        self.steps = 0

    def grids(self) -> torch.Tensor:
        return self.grid

    def cett(self, layers: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        keys = list(zip(layers.tolist(), t.tolist()))
        for layer, _ in keys:
            self.products[layer] += 1
        miss = [i for i, k in enumerate(keys) if k not in self.memo]
        if miss:
            vals = self.dense.cett(layers[miss], t[miss]).tolist()
            self.memo.update({keys[i]: v for i, v in zip(miss, vals)})
        return torch.tensor([self.memo[k] for k in keys], dtype=torch.float32)


def build(tokens: int, seq_len: int, batch_size: int, layer_step: int, cache: str | None
          ) -> tuple[list[dict], str]:
    """Each batch's (h, w, norms) of the chosen layers, from the dense pass (or the cache)."""
    if cache and Path(cache).is_file():
        saved = torch.load(cache)
        return saved["batches"], saved["label"]
    from sparsinglaw.data import eval_batches
    from sparsinglaw.models import load_model
    from sparsinglaw.sparse import Model, Rule, run_pass

    try:
        lm = load_model("smollm2-135m", device="cpu")
    except Exception as e:  # noqa: BLE001 - say why, then stop: the numbers need a real trained model
        raise SystemExit(f"could not load smollm2-135m ({e}); train one with `python -m sparsinglaw train "
                         "--preset 5m` and adapt build()") from e
    m = Model(lm.model)
    layers = list(range(0, m.n_layers, layer_step))
    out = []
    with torch.no_grad():
        for ids in eval_batches(lm.tokenizer, None, tokens, seq_len, batch_size):
            dense = run_pass(m, ids, Rule("dense"), "all", capture=True)
            out.append({"h": torch.stack([dense.dense_h[i] for i in layers]), "w": m.w_stack[layers].clone(),
                        "norms": m.norm_stack[layers].clone(), "layers": layers, "tokens": ids.numel()})
            del dense
    label = f"smollm2-135m fp32, layers {layers}"
    if cache:
        torch.save({"batches": out, "label": label}, cache)
    return out, label


def load_impl(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("metrics_against", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def replay(mod: ModuleType, denses: list[metrics.DenseLayers], grids: list[torch.Tensor], memos: list[dict],
           taus: list[float]) -> tuple[list[int], list[int], list[torch.Tensor]]:
    """One fast search's threshold phase: (products per search, steps per batch search, thresholds per
    (tau, batch)) with `mod`'s ThresholdSearch and thresholds_all."""
    counted = [Counted(d, g, mm) for d, g, mm in zip(denses, grids, memos)]
    searches = [mod.ThresholdSearch(c) for c in counted]
    products, steps, ths = [], [], []
    for tau in taus:
        hint = None
        for c, s in zip(counted, searches):
            before, steps0 = list(c.products), c.steps
            th = mod.thresholds_all([s], tau, hint)[0]
            products += [a - b for a, b in zip(c.products, before)]
            steps.append(c.steps - steps0)
            ths.append(th)
            hint = s if hasattr(s, "answers") else th  # this code hints with a search, older code with a tensor
    return products, steps, ths


def summary(products: list[int], steps: list[int]) -> dict:
    return {"searches": len(products), "products_mean": statistics.mean(products),
            "products_median": statistics.median(products), "products_max": max(products),
            "products_hist": dict(sorted(Counter(products).items())),
            "steps_mean": statistics.mean(steps), "steps_max": max(steps)}


def check_reference(batch: dict, denses: list[metrics.DenseLayers], memos: list[dict], grids: list[torch.Tensor],
                    taus: list[float], picks: list[int]) -> tuple[int, int, list]:
    """The current search's thresholds on batch 0 against `reference_layer_threshold`'s: (checked, equal
    as floats, mismatches). A match is the same candidate index: `grids()` gets the grid's top end (the
    0.99 quantile) to fp32 rounding of `torch.quantile`'s, so the values may differ in the last bits. The
    guard aside: 0 where even the smallest candidate exceeds tau (the reference wraps to the top one)."""
    _, _, ths = replay(metrics, denses, grids, memos, taus)
    checked, exact, bad = 0, 0, []
    for i in picks:
        ref_grid = metrics.reference_grid(batch["h"][i].abs().float() * batch["norms"][i])
        for k, tau in enumerate(taus):
            ref = metrics.reference_layer_threshold(batch["h"][i], batch["w"][i], batch["norms"][i], tau)
            got = float(ths[k * len(denses)][i])
            ref_idx = int((ref_grid == ref).nonzero()[0])
            got_idx = int((grids[0][i] == got).nonzero()[0]) if got != 0.0 else GUARD
            checked, exact = checked + 1, exact + (got == ref)
            if not (got_idx == ref_idx or (got_idx == GUARD and ref_idx == metrics.GRID_POINTS - 1)):
                bad.append((tau, i, got, ref))
    return checked, exact, bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4 * 8192)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--layer-step", type=int, default=5, help="every n-th layer (1: all)")
    ap.add_argument("--against", help="an older metrics.py to compare (products, identical thresholds)")
    ap.add_argument("--cache", help="file for the dense intermediates (loaded when it exists)")
    ap.add_argument("--no-reference", action="store_true", help="skip the check against the reference search")
    args = ap.parse_args()

    t0 = time.perf_counter()
    batches, label = build(args.tokens, args.seq_len, args.batch_size, args.layer_step, args.cache)
    denses = [metrics.DenseLayers.build(list(b["h"]), b["w"], b["norms"]) for b in batches]
    grids = [d.grids() for d in denses]
    memos: list[dict] = [{} for _ in denses]
    print(f"{label}: {len(batches)} batches of {batches[0]['tokens']} tokens "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)

    impls = [("current", metrics)] + ([("against", load_impl(args.against))] if args.against else [])
    rows = []
    for name, taus in SEQUENCES.items():
        got = {}
        for impl, mod in impls:
            products, steps, ths = replay(mod, denses, grids, memos, taus)
            got[impl] = ths
            rows.append({"impl": impl, "sequence": name, "taus": taus, **summary(products, steps)})
            rows[-1]["_p"], rows[-1]["_s"] = products, steps
        if args.against:  # bit-identical thresholds, every batch, layer and tau
            same = all(torch.equal(a, b) for a, b in zip(got["current"], got["against"]))
            assert same, f"{name}: thresholds differ from {args.against}"
    for impl, _ in impls:
        ps = [x for r in rows if r["impl"] == impl for x in r["_p"]]
        ss = [x for r in rows if r["impl"] == impl for x in r["_s"]]
        rows.append({"impl": impl, "sequence": "all", "taus": [], **summary(ps, ss)})
    for r in rows:
        r.pop("_p", None), r.pop("_s", None)
    checked, exact, bad = 0, 0, []
    if not args.no_reference:
        picks = sorted({0, len(batches[0]["layers"]) // 2, len(batches[0]["layers"]) - 1})
        checked, exact, bad = check_reference(batches[0], denses, memos, grids, SEQUENCES["h200-0.1b"], picks)

    print(f"\n{'impl':<9}{'sequence':<18}{'searches':>9}{'mean':>7}{'median':>7}{'max':>5}{'steps':>7}"
          f"{'max':>5}  products per search: count")
    for r in rows:
        hist = " ".join(f"{k}:{v}" for k, v in r["products_hist"].items())
        print(f"{r['impl']:<9}{r['sequence']:<18}{r['searches']:>9}{r['products_mean']:>7.2f}"
              f"{r['products_median']:>7.1f}{r['products_max']:>5}{r['steps_mean']:>7.2f}{r['steps_max']:>5}  {hist}")
    if args.against:
        print(f"thresholds identical to {args.against} for every batch, layer and tau")
    if checked:
        print(f"reference_layer_threshold (batch 0, {checked} thresholds): {checked - len(bad)} the same "
              f"candidate ({exact} equal as floats; grids() rounds the grid's top end differently), "
              f"{len(bad)} different")
    result = {"benchmark": "threshold_probes", "date": dt.datetime.now(dt.timezone.utc).isoformat(),
              "data": label, "batches": len(batches), "batch_tokens": batches[0]["tokens"],
              "hardware": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                           "torch_threads": torch.get_num_threads()},
              "versions": {"python": platform.python_version(), "torch": torch.__version__},
              "against": args.against, "identical_to_against": bool(args.against), "reference_checked": checked,
              "reference_exact": exact, "reference_mismatches": bad,
              "seconds": time.perf_counter() - t0, "rows": rows}
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "dev" / "threshold_probes.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path} ({result['seconds']:.0f} s)")
    assert not bad, f"thresholds differ from reference_layer_threshold's: {bad}"


if __name__ == "__main__":
    main()
