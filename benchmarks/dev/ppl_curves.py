"""Real PPL-ratio curves for tuning the tau solver offline: every batch's F and activation ratio on a dense
grid of tau, on a trained model's disjoint token slices (the fast search's own thresholds and passes).

    python benchmarks/ppl_curves.py --model CKPT --data val.jsonl --tokens 65536 --slices 3 --out DIR

Writes benchmarks/results/dev/ppl_curves_<tag>.json; `python benchmarks/dev/solver_sim.py --curves FILE` replays
the solver and the authors' bisection on them (no device needed). F of a finite sample is a rough step
function of tau: the grid (1% apart in tau) shows that roughness, which synthetic curves only imitate.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from measure_speed import batches_for  # noqa: E402

from sparsinglaw import search as s  # noqa: E402
from sparsinglaw.sparse import Model  # noqa: E402


def grid(lo: float, hi: float, n: int) -> list[float]:
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default=None)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--slices", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tau-min", type=float, default=0.05)
    ap.add_argument("--tau-max", type=float, default=0.35)
    ap.add_argument("--points", type=int, default=200)
    ap.add_argument("--tag", default="h200_0.1b")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.random_tokens = False

    from sparsinglaw.models import load_model

    lm = load_model(args.model, device="cuda" if torch.cuda.is_available() else "cpu", dtype="auto")
    m = Model(lm.model)
    every = batches_for(args, lm.tokenizer, lm.model.config.vocab_size, args.tokens * args.slices)
    per = len(every) // args.slices
    taus = grid(args.tau_min, args.tau_max, args.points)
    curves = []
    for i in range(args.slices):
        t0 = time.perf_counter()
        counter = s.PassCounter(per)
        engine = s.FastSearch(m, every[i * per:(i + 1) * per], "all", counter)
        states = engine.states
        ppl, act = [], []
        for tau in taus:
            parts = engine.parts(tau, detail=False, lockstep=True)
            ppl.append([math.exp(r.loss - d.loss) for d, r, _ in parts])
            act.append([float(r.layer_ratio.mean()) for _, r, _ in parts])
        curves.append({"slice": i, "batches": len(states), "batch_tokens": states[0].ids.numel(),
                       "batch_ppl_ratio": ppl, "batch_activation_ratio": act})
        print(f"slice {i}: {len(taus)} taus x {len(states)} batches in {time.perf_counter() - t0:.1f} s", flush=True)
        del states, engine
    result = {"benchmark": "ppl_curves", "date": dt.datetime.now(dt.timezone.utc).isoformat(), "model": lm.name,
              "tokens": args.tokens, "seq_len": args.seq_len, "taus": taus, "curves": curves,
              "hardware": {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
              "versions": {"python": platform.python_version(), "torch": torch.__version__}}
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "dev" / f"ppl_curves_{args.tag}.json"
    text = json.dumps(result) + "\n"
    path.write_text(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / path.name).write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
