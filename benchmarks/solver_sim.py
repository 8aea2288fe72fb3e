"""How many evaluations the CETT-PPL-p% root finder needs, and how close it lands to the reference's
bisection, on synthetic PPL-ratio curves with the noise real ones have.

Measured curves (benchmarks/results/measure_speed_h200_*.json) follow ln ln F = a + k ln tau with k
1.35-1.5 and scatter about 1.2e-4 in F around that line on 64K tokens, in fp32 as in bf16; single
batches differ in ln F by up to a third. This simulates exactly that (4 batches, a deterministic noise
per batch and tau, activation ratio falling 0.2 per unit of ln tau) and runs the solver with and without
its pilot, and the authors' bisection (tol 1e-6) on the same curve:

    python benchmarks/solver_sim.py            # prints a table, writes benchmarks/results/solver_sim.json

A design tool: no device, seconds on a laptop.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
import random
import statistics
from pathlib import Path
from types import SimpleNamespace

from sparsinglaw.search import Batchwise, solve_tau

TARGET = 1.01


def curve(tau_star: float, k: float, noise: float, seed: int):
    """(evaluate, activation_ratio, counter) for one synthetic model and sample: evaluate(tau) runs the
    batches as the fast search does (in order, stopping early when F is clearly off)."""
    rng = random.Random(seed)
    scales = [math.exp(rng.gauss(0, 0.2)) for _ in range(4)]
    c = math.log(TARGET) / tau_star ** k

    def batch_ratios(tau: float, n: int) -> list[float]:
        out = []
        for b in range(n):
            r = random.Random(hash((round(tau * 1e12), b, seed)))
            out.append(math.exp(scales[b] * c * tau ** k + r.gauss(0, 2 * noise)))
        return out

    def act(tau: float) -> float:
        return 0.16 - 0.2 * math.log(tau / tau_star)

    state = {"batches": 0}
    batchwise = Batchwise(4, TARGET)

    def full(tau: float):
        r = batch_ratios(tau, 4)
        return SimpleNamespace(tau=tau, ppl_ratio=sum(r) / 4, batch_ratios=r, partial=False,
                               activation_ratio=act(tau))

    def evaluate(tau: float):
        r = batch_ratios(tau, 4)
        got = batchwise.run(lambda i: (r[i], math.log(r[i])))
        state["batches"] += len(got)
        ev = SimpleNamespace(tau=tau, ppl_ratio=sum(got) / len(got), batch_ratios=got, partial=len(got) < 4,
                             activation_ratio=act(tau))
        batchwise.learn(ev)
        return ev

    return full, evaluate, act, state


def bisection(full, tol: float) -> tuple[float, int]:
    lo, hi, n, tau = 0.0, 1.0, 0, 0.5
    while hi - lo > tol:
        tau = (lo + hi) / 2
        n += 1
        if full(tau).ppl_ratio > TARGET:
            hi = tau
        else:
            lo = tau
    return tau, n


def main() -> None:
    rows = []
    for tau_star in (0.04, 0.11, 0.25):
        for k in (1.3, 1.8, 2.5):
            for noise in (0.0, 1.2e-4, 2e-4):
                stats = {"batchwise": []}
                for seed in range(40):
                    full, evaluate, act, state = curve(tau_star, k, noise, seed)
                    ref_tau, _ = bisection(full, 1e-6)
                    ev, msg = solve_tau(evaluate, TARGET)
                    stats["batchwise"].append((state["batches"] / 4, abs(act(ev.tau) - act(ref_tau)),
                                               abs(ev.ppl_ratio / TARGET - 1), bool(msg)))
                for name, st in stats.items():
                    n = [s[0] for s in st]
                    da = [s[1] for s in st]
                    rows.append({"tau_star": tau_star, "k": k, "noise": noise, "solver": name,
                                 "full_evals_mean": statistics.mean(n), "full_evals_max": max(n),  # in batches / 4
                                 "dA_median": statistics.median(da), "dA_max": max(da),
                                 "dA_within_0.002": sum(d <= 0.002 for d in da) / len(da),
                                 "F_err_max": max(s[2] for s in st), "failed": sum(s[3] for s in st)})
    print(f"{'tau*':>5} {'k':>4} {'noise':>7} {'solver':>9} {'evals':>6} {'max':>4} {'dA med':>8} "
          f"{'dA max':>8} {'<=.002':>7} {'F err max':>9} {'fail':>4}")
    for r in rows:
        print(f"{r['tau_star']:>5} {r['k']:>4} {r['noise']:>7.1e} {r['solver']:>9} {r['full_evals_mean']:>6.2f} "
              f"{r['full_evals_max']:>4.1f} {r['dA_median']:>8.5f} {r['dA_max']:>8.5f} {r['dA_within_0.002']:>7.2f} "
              f"{r['F_err_max']:>9.2e} {r['failed']:>4}")
    for name in ("batchwise",):
        sel = [r for r in rows if r["solver"] == name]
        print(f"{name}: mean full evaluations {statistics.mean(r['full_evals_mean'] for r in sel):.2f}")
    out = Path(__file__).resolve().parent / "results" / "solver_sim.json"
    out.write_text(json.dumps({"benchmark": "solver_sim", "date": dt.datetime.now(dt.timezone.utc).isoformat(),
                               "versions": {"python": platform.python_version()}, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
