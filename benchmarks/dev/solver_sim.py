"""How many evaluations the CETT-PPL-p% root finder needs, and how close it lands to the reference's
bisection, on synthetic PPL-ratio curves with the noise real ones have.

Measured curves (benchmarks/results/measure_speed_h200_*.json) follow ln ln F = a + k ln tau roughly,
with k 0.9-4.6, and scatter about 1.2e-4 in F around their trend on 64K tokens, in fp32 as in bf16;
single batches differ in ln F by up to a half, their ratios drift with tau, and ln ln F bends (its
local slope varied 2x across one bracket). This simulates those shapes (4 batches, a deterministic
noise per batch and tau, activation ratio falling 0.2 per unit of ln tau) and runs the solver, and the
authors' bisection (tol 1e-6) on the same curve:

    python benchmarks/dev/solver_sim.py        # prints a table, writes benchmarks/results/dev/solver_sim.json
    python benchmarks/dev/solver_sim.py --curves benchmarks/results/dev/ppl_curves_*.json   # real curves (below)

With --curves it replays the solver and the bisection on real curves measured on the H200
(`benchmarks/ppl_curves.py`: every batch's F and activation ratio on 200 taus 1% apart, interpolated
between them), and estimates the fast search's time from the costs measured there.

The synthetic table's last column, `oracle`, is how often the noise-free crossing itself lands within
0.002 of activation ratio of the bisection on the noisy curve: the ceiling any solver can reach there.

A design tool: no device, seconds on a laptop.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import platform
import random
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

from sparsinglaw.solver import Point, TauSolver

TARGET = 1.01


def curve(tau_star: float, k: float, noise: float, seed: int, bend: float = 0.0, hetero: float = 0.0):
    """(full, evaluate, act, state) for one synthetic model and sample: evaluate(tau) runs every batch, as
    the fast search does.

    Batch b: ln ln F_b = ln ln target + off_b + k_b u (1 + bend tanh u), u = ln(tau / tau_star), with
    off_b ~ N(0, 0.25) and k_b = k exp(N(0, hetero)) (batches whose ratio to the set drifts with tau),
    plus a deterministic noise per batch and tau (sd 2 noise on one batch, noise on the mean of four)."""
    rng = random.Random(seed)
    yt = math.log(math.log(TARGET))
    bs = [(rng.gauss(0, 0.25), k * math.exp(rng.gauss(0, hetero))) for _ in range(4)]

    def batch_ratios(tau: float, n: int) -> list[float]:
        u = math.log(tau / tau_star)
        out = []
        for b in range(n):
            off, kb = bs[b]
            y = min(yt + off + kb * u * (1 + bend * math.tanh(u)), 3.0)
            r = random.Random(hash((round(tau * 1e12), b, seed)))
            out.append(math.exp(math.exp(y) + r.gauss(0, 2 * noise)))
        return out

    def act(tau: float) -> float:
        return 0.16 - 0.2 * math.log(tau / tau_star)

    full, evaluate, state = searched(lambda tau: batch_ratios(tau, 4), act, 4)
    return full, evaluate, act, state


def searched(ratios, act, n: int, tokens: int | None = None):
    """(full, evaluate, state) of a curve given every batch's F at tau (`ratios(tau)`): `full` is the
    whole set's F, for the bisection; `evaluate` gives the solver's Point, counting batches and
    evaluations in `state`."""
    state = {"batches": 0, "evaluations": 0}

    def full(tau: float):
        return SimpleNamespace(tau=tau, ppl_ratio=sum(ratios(tau)) / n)

    def evaluate(tau: float) -> Point:
        r = ratios(tau)
        state["batches"] += n
        state["evaluations"] += 1
        return Point(tau, sum(r) / n, act(tau), tokens)

    return full, evaluate, state


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


FAMILIES = {  # curve shapes seen on the H200: straight, batches drifting apart, ln ln F bending either way
    "straight": {"bend": 0.0, "hetero": 0.0},
    "hetero": {"bend": 0.0, "hetero": 0.3},
    "concave": {"bend": -0.6, "hetero": 0.15},
    "convex": {"bend": 0.6, "hetero": 0.15},
}


# costs of the fast search on the 0.1B model, 64K tokens, H200 (with fused RoPE/RMSNorm): dense passes and
# grids once, then per batch at one tau a threshold search and a sparse pass; the reference at tol 1e-6
FIXED_S, PER_BATCH_S, REFERENCE_S = 0.122, 0.031, 13.0


def real_curve(taus: list[float], curve: dict, order: tuple[int, ...] | None = None):
    """(full, evaluate, act, state) replaying one measured slice: ln F and activation ratio of every batch
    (taken in `order`), linear in ln tau between grid points."""
    xs = [math.log(t) for t in taus]
    n = curve["batches"]
    order = order or tuple(range(n))
    lnf = [[math.log(max(row[b], 1e-12)) for b in order] for row in curve["batch_ppl_ratio"]]
    acts = [[row[b] for b in order] for row in curve["batch_activation_ratio"]]

    def at(table, tau: float, b: int) -> float:
        x = min(max(math.log(tau), xs[0]), xs[-1])
        i = min(max(0, next((j for j, v in enumerate(xs) if v >= x), len(xs) - 1) - 1), len(xs) - 2)
        w = (x - xs[i]) / (xs[i + 1] - xs[i])
        return table[i][b] * (1 - w) + table[i + 1][b] * w

    def ratios(tau: float) -> list[float]:
        return [math.exp(at(lnf, tau, b)) for b in range(n)]

    def act(tau: float) -> float:
        return sum(at(acts, tau, b) for b in range(n)) / n

    full, evaluate, state = searched(ratios, act, n, tokens=n * curve["batch_tokens"])
    return full, evaluate, act, state


def summary(cases: list[tuple]) -> dict:
    """Statistics of (full evaluations, activation ratio - the bisection's, |F / target - 1|, failed[, the
    same difference for an oracle that answers where the noise-free curve crosses the target]) cases."""
    n = sorted(c[0] for c in cases)
    da = [abs(c[1]) for c in cases]
    out = {"cases": len(cases), "full_evals_mean": statistics.mean(n), "full_evals_p90": n[int(0.9 * len(n))],
           "full_evals_max": n[-1], "dA_median": statistics.median(da), "dA_max": max(da),
           "dA_within_0.002": sum(d <= 0.002 for d in da) / len(da), "F_err_max": max(c[2] for c in cases),
           "failed": sum(c[3] for c in cases)}
    if len(cases[0]) > 4:  # the floor: how often even the noise-free crossing is within 0.002 of the bisection
        out["oracle_within_0.002"] = sum(abs(c[4]) <= 0.002 for c in cases) / len(cases)
    return out


def table(rows: list[dict], first: str, fmt: str) -> None:
    print(f"{first:>10} {'cases':>5} {'evals':>6} {'p90':>5} {'max':>5} {'dA med':>8} {'dA max':>7} {'<=.002':>7} "
          f"{'F err max':>9} {'fail':>4}" + (f" {'oracle':>7}" if "oracle_within_0.002" in rows[0] else ""))
    for r in rows:
        print(f"{fmt.format(**r):>10} {r['cases']:>5} {r['full_evals_mean']:>6.2f} {r['full_evals_p90']:>5.2f} "
              f"{r['full_evals_max']:>5.2f} {r['dA_median']:>8.5f} {r['dA_max']:>7.4f} {r['dA_within_0.002']:>7.2f} "
              f"{r['F_err_max']:>9.2e} {r['failed']:>4}"
              + (f" {r['oracle_within_0.002']:>7.2f}" if "oracle_within_0.002" in r else ""))


def save(name: str, rows: list[dict], **extra) -> None:
    out = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "dev" / f"{name}.json"
    out.write_text(json.dumps({"benchmark": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(), **extra,
                               "versions": {"python": platform.python_version()}, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


def replay(files: list[str]) -> None:
    """The solver on every measured slice, in every batch order (the order of the batch means)."""
    cases, speedups = [], []
    for f in files:
        d = json.loads(Path(f).read_text())
        for c in d["curves"]:
            for order in itertools.permutations(range(c["batches"])):
                full, evaluate, act, state = real_curve(d["taus"], c, order)
                ref_tau, _ = bisection(full, 1e-6)
                res = TauSolver(TARGET).solve(evaluate)
                cases.append((state["batches"] / c["batches"], act(res.tau) - act(ref_tau),
                              abs(res.point.ppl_ratio / TARGET - 1), not res.success))
                speedups.append(REFERENCE_S / (FIXED_S + PER_BATCH_S * state["batches"]))
    rows = [{**summary(cases), "est_speedup_min": min(speedups),
             "est_speedup_ge_20": sum(x >= 20 for x in speedups) / len(speedups)}]
    table(rows, "curves", "real")
    print(f"estimated speed-up against tol 1e-6 at least {rows[0]['est_speedup_min']:.1f}x, >= 20x in "
          f"{100 * rows[0]['est_speedup_ge_20']:.0f}% of cases")
    save("solver_replay", rows, curves=[Path(f).name for f in files],
         costs_s={"fixed": FIXED_S, "per_batch": PER_BATCH_S, "reference": REFERENCE_S})


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--curves":
        replay(sys.argv[2:])
        return
    rows = []
    for family, shape in FAMILIES.items():
        for noise in (0.0, 1.2e-4):
            cases = []
            for tau_star in (0.04, 0.11, 0.18):
                for k in (1.0, 1.8, 3.0, 4.5):
                    for seed in range(25):
                        full, evaluate, act, state = curve(tau_star, k, noise, seed, **shape)
                        ref_tau, _ = bisection(full, 1e-6)
                        trend_tau, _ = bisection(curve(tau_star, k, 0.0, seed, **shape)[0], 1e-9)
                        res = TauSolver(TARGET).solve(evaluate)
                        cases.append((state["batches"] / 4, act(res.tau) - act(ref_tau),
                                      abs(res.point.ppl_ratio / TARGET - 1), not res.success,
                                      act(trend_tau) - act(ref_tau)))
            rows.append({"family": family, **shape, "noise": noise, **summary(cases)})
    table(rows, "family", "{family} {noise:.0e}")
    save("solver_sim", rows)


if __name__ == "__main__":
    main()
