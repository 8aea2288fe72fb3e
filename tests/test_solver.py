"""The tau solver of CETT-PPL-p%: convergence, acceptance, failure reports, and a replay on measured curves."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from sparsinglaw.solver import (
    CONVERGED,
    OUT_OF_REACH_HIGH,
    OUT_OF_REACH_LOW,
    Acceptance,
    Point,
    TauSolver,
)

ROOT = Path(__file__).resolve().parent.parent


def test_reaches_target_on_a_power_law_curve_in_few_evaluations():
    calls = []

    def evaluate(tau):
        calls.append(tau)
        return Point(tau, math.exp(0.4 * tau ** 2.7))

    res = TauSolver(1.01, Acceptance(ftol=1e-5)).solve(evaluate)
    assert res.success and res.status == CONVERGED
    assert abs(res.point.ppl_ratio / 1.01 - 1) <= 1e-5
    assert len(calls) <= 8 and res.points == [Point(t, math.exp(0.4 * t ** 2.7)) for t in calls]


@pytest.mark.parametrize("tau_star,k", [(0.0773, 1.0), (0.083, 1.0), (0.11, 1.0)])
def test_answers_where_f_crosses_the_target_not_anywhere_within_its_noise(tau_star, k):
    """Where F is flat in tau, an answer merely within the noise of F (3e-4) can sit 0.002-0.003 of
    activation ratio from the crossing; the solver keeps going until the activation ratio is within atol
    of where F crosses the target."""

    def evaluate(tau):
        return Point(tau, math.exp(math.log(1.01) * (tau / tau_star) ** k), 0.16 - 0.2 * math.log(tau / tau_star))

    acc = Acceptance()
    res = TauSolver(1.01, acc).solve(evaluate)
    assert res.success and abs(res.point.activation_ratio - 0.16) <= acc.atol
    assert abs(res.point.ppl_ratio / 1.01 - 1) <= acc.loose
    # judged by F alone, the same curve is answered 2e-3 or more from the crossing
    loose = TauSolver(1.01, Acceptance(atol=None)).solve(evaluate)
    assert abs(loose.point.activation_ratio - 0.16) > 2e-3


def test_says_when_the_target_is_out_of_reach():
    res = TauSolver(1.01).solve(lambda tau: Point(tau, 1.0 + 0.001 * tau))
    assert not res.success and res.status == OUT_OF_REACH_HIGH and res.tau == 1.0 and "even tau = 1" in res.message
    res = TauSolver(1.01).solve(lambda tau: Point(tau, 1.5))
    assert not res.success and res.status == OUT_OF_REACH_LOW and res.tau <= 1e-7


def test_returns_what_evaluate_returned():
    class Ev:
        def __init__(self, tau):
            self.tau, self.point = tau, Point(tau, math.exp(0.4 * tau ** 2))

    res = TauSolver(1.01).solve(Ev)
    assert isinstance(res.evaluation, Ev) and res.evaluation.point == res.point


def test_acceptance_widens_with_fewer_tokens_up_to_its_cap():
    acc = Acceptance()
    assert acc.widen(None) == 1.0 and acc.widen(65536) == 1.0 and acc.widen(1 << 20) == 1.0
    assert acc.widen(65536 // 2) == pytest.approx(math.sqrt(2))
    assert acc.widen(64) == pytest.approx(acc.loose_max / acc.loose)
    assert json.loads(json.dumps(acc.to_json()))["atol"] == acc.atol


def _replay(path: Path, curve: dict, taus: list[float], order: tuple[int, ...]):
    """evaluate(tau) on one measured slice: every batch's ln F and activation ratio, linear in ln tau
    between the recorded taus, batches in `order`, F the mean over batches."""
    xs = [math.log(t) for t in taus]
    n = curve["batches"]
    lnf = [[math.log(max(row[b], 1e-12)) for b in order] for row in curve["batch_ppl_ratio"]]
    acts = [[row[b] for b in order] for row in curve["batch_activation_ratio"]]

    def at(table, tau, b):
        x = min(max(math.log(tau), xs[0]), xs[-1])
        i = min(max(0, next((j for j, v in enumerate(xs) if v >= x), len(xs) - 1) - 1), len(xs) - 2)
        w = (x - xs[i]) / (xs[i + 1] - xs[i])
        return table[i][b] * (1 - w) + table[i + 1][b] * w

    def evaluate(tau):
        f = sum(math.exp(at(lnf, tau, b)) for b in range(n)) / n
        return Point(tau, f, sum(at(acts, tau, b) for b in range(n)) / n, n * curve["batch_tokens"])

    return evaluate


def test_replay_on_recorded_curves_gives_the_recorded_taus():
    """The solver on every curve measured on a GPU (benchmarks/results/dev/ppl_curves_*.json), in every batch
    order: the same tau, bit for bit, as the solver it replaced (tests/data/solver_replay_taus.json)."""
    want = json.loads((ROOT / "tests" / "data" / "solver_replay_taus.json").read_text())
    got = []
    for name in sorted({c["file"] for c in want["cases"]}):
        d = json.loads((ROOT / "benchmarks" / "results" / "dev" / name).read_text())
        for ci, c in enumerate(d["curves"]):
            for order in itertools.permutations(range(c["batches"])):
                res = TauSolver(want["target"]).solve(_replay(ROOT, c, d["taus"], order))
                assert res.success
                got.append((name, ci, list(order), res.tau))
    assert len(got) == len(want["cases"]) == 144
    assert got == [(c["file"], c["curve"], c["order"], c["tau"]) for c in want["cases"]]
