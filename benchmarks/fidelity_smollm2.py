"""Our CETT-PPL-p% against an independent implementation of the authors' procedure (tests/authors.py), on
SmolLM2-135M, fp32, CPU, the default evaluation text:

1. at tau = 0.1: every layer's threshold (ours: the reference's `reference_layer_threshold` and the fast
   `ThresholdSearch`) against theirs, and the activation ratio of the sparse pass;
2. `--search reference` at p against their bisection, round by round (tol as given);
3. the fast and the reference search's headlines and bands: do they overlap, does each hold the other's
   headline.

    python benchmarks/fidelity_smollm2.py [--tokens 2048] [--tol 1e-3] [--p 1]

Writes benchmarks/results/fidelity_smollm2_cpu.json. About 15 minutes on one CPU thread at 2,048 tokens
and tol 1e-3 (each bisection round is 30 layers x 16 masked products, in both implementations).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import authors  # noqa: E402

from sparsinglaw.data import eval_batches  # noqa: E402
from sparsinglaw.metrics import DenseLayers, ThresholdSearch, reference_layer_threshold  # noqa: E402
from sparsinglaw.models import load_model  # noqa: E402
from sparsinglaw.search import fast_search, reference_search  # noqa: E402
from sparsinglaw.sparse import Model, Rule, run_pass  # noqa: E402


def at_tau(model, m: Model, batches, tau: float) -> dict:
    """Per-layer thresholds and activation ratio at tau: ours against theirs (first batch)."""
    ids = batches[0]
    _, hs = authors.dense(model, ids)
    theirs = [authors.layer_threshold(h, d.weight, tau) for h, d in zip(hs, authors._downs(model))]
    dense = run_pass(m, ids, Rule("dense"), capture=True)
    ref = [reference_layer_threshold(h, m.w_stack[i], m.norms[i], tau) for i, h in enumerate(dense.dense_h)]
    fast = ThresholdSearch(DenseLayers.build(dense.dense_h, m.w_stack, m.norm_stack)).thresholds(tau).tolist()
    rel = [abs(a / b - 1) if b else abs(a) for a, b in zip(ref, theirs)]
    rel_fast = [abs(a / b - 1) if b else abs(a) for a, b in zip(fast, theirs)]
    th = torch.tensor(ref)
    _, act_theirs = authors.sparse(model, ids, theirs)
    ours = run_pass(m, ids, Rule("cett_authors", thresholds=th), detail=True)
    ours_fp32 = run_pass(m, ids, Rule("cett", thresholds=th), detail=True)
    return {"tau": tau, "max_rel_threshold_diff_reference": max(rel), "max_rel_threshold_diff_fast": max(rel_fast),
            "thresholds_equal_reference": sum(r == 0 for r in rel), "layers": len(rel),
            "activation_ratio_theirs": act_theirs, "activation_ratio_ours": float(ours.layer_ratio.mean()),
            "activation_ratio_ours_fp32_test": float(ours_fp32.layer_ratio.mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--p", type=float, default=1.0)
    ap.add_argument("--skip-authors-bisection", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model("smollm2-135m", device="cpu", dtype="fp32")
    batches = eval_batches(lm.tokenizer, None, args.tokens, 512, 4)
    model, m = lm.model, Model(lm.model)
    out: dict = {"benchmark": "fidelity_smollm2", "date": dt.datetime.now(dt.timezone.utc).isoformat(),
                 "tokens": sum(b.numel() for b in batches), "tol": args.tol, "p": args.p,
                 "versions": {"python": platform.python_version(), "torch": torch.__version__}}
    t0 = time.perf_counter()
    out["at_tau_0.1"] = at_tau(model, m, batches, 0.1)
    print(json.dumps(out["at_tau_0.1"], indent=1), flush=True)
    fast = fast_search(m, batches, args.p, progress=True)
    ref = reference_search(m, batches, args.p, tol=args.tol, progress=True)
    for name, res in (("fast", fast), ("reference", ref)):
        out[name] = {"evaluated": res.evaluation.brief(), "evaluations": len(res.history),
                     "band": res.band.to_json() if res.band else None, "history": res.history}
        print(name, res.evaluation.brief(), "\n  ", res.band.describe() if res.band else None, flush=True)
    fb, rb = fast.band, ref.band
    out["bands"] = {
        "overlap": fb.activation_ratio_interval[0] <= rb.activation_ratio_interval[1]
        and rb.activation_ratio_interval[0] <= fb.activation_ratio_interval[1],
        "fast_band_holds_reference_headline": fb.activation_ratio_interval[0] <= rb.activation_ratio
        <= fb.activation_ratio_interval[1],
        "reference_band_holds_fast_headline": rb.activation_ratio_interval[0] <= fb.activation_ratio
        <= rb.activation_ratio_interval[1]}
    print(out["bands"], flush=True)
    if not args.skip_authors_bisection:
        theirs = authors.cett_ppl(model, batches, args.p, args.tol)
        steps = [{"tau": r["tau"], "ppl_ratio_theirs": r["ppl_ratio"], "ppl_ratio_ours": h["ppl_ratio"],
                  "activation_ratio_theirs": r["activation_ratio"], "activation_ratio_ours": h["activation_ratio"]}
                 for h, r in zip(ref.history, theirs)]
        diff = max(abs(s["ppl_ratio_theirs"] - s["ppl_ratio_ours"]) for s in steps)
        out["retrace"] = {"same_taus": [h["tau"] for h in ref.history] == [r["tau"] for r in theirs],
                          "rounds": len(theirs), "max_ppl_ratio_diff": diff, "steps": steps}
        print({k: v for k, v in out["retrace"].items() if k != "steps"}, flush=True)
    out["seconds"] = time.perf_counter() - t0
    path = ROOT / "benchmarks" / "results" / "fidelity_smollm2_cpu.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}; {out['seconds']:.0f} s")



if __name__ == "__main__":
    main()
