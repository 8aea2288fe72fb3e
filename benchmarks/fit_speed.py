"""How long does fitting a 40-point activation-ratio curve with 1,000 bootstrap resamples take?

Target: under 10 s on a 2-core machine. Times three parts separately, so a
regression shows where it is: the multi-start fit of one form, the batched bootstrap of that form, and the
full `fit_series` (all four forms, 1,000 resamples for the chosen law and 250 for each other form, forecasts
and bands). Writes benchmarks/results/fit_speed_cpu.json.

    python benchmarks/fit_speed.py
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import record

from sparsinglaw import laws

warnings.filterwarnings("ignore", category=RuntimeWarning)
RUNS = {  # the paper's published coefficients (its Table of fitted laws): form, alpha, b, c, A0, non-embedding params
    "relu-0.1B": ("relu", 0.101, -0.0151, 3.20, 0.0614, 108.5e6),
    "relu-0.8B": ("relu", 1.01, -3.49, 0.00797, 0.0721, 759.7e6),
    "silu-0.4B": ("silu", 1.03, None, 0.420, 0.385, 452.2e6),
}
N_POINTS, N_BOOT, REPEATS = 40, 1000, 3


def curve(key: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    form, al, b, c, a0, params = RUNS[key]
    start = 1.0 if form == "relu" else max((c / (a0 - 0.31)) ** (1 / al), 1.0)
    D = np.linspace(start, 385 * params / 1e9, N_POINTS)
    A = np.exp(-c * D**al + b) + a0 if form == "relu" else a0 - c * D ** (-al)
    return D, A + np.random.default_rng(seed).normal(0, 5e-4, N_POINTS)


def best_of(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    rows = []
    for key, spec in RUNS.items():
        D, A = curve(key)
        form = spec[0]
        fit = laws.fit_form(form, D, A)
        t_fit = best_of(lambda: laws.fit_form(form, D, A))  # noqa: B023
        reg = laws.REGISTRY[form]
        t_boot = best_of(lambda: laws._bootstrap(fit, reg, D, A, N_BOOT, 0.95, 0))  # noqa: B023
        t_all = best_of(lambda: laws.fit_series(laws.Series(D * 1e9, A), bootstrap=N_BOOT))  # noqa: B023
        full = laws.fit_series(laws.Series(D * 1e9, A), bootstrap=N_BOOT)
        rows.append({"series": key, "form": form, "points": N_POINTS, "bootstrap": N_BOOT,
                     "fit_s": round(t_fit, 4), "bootstrap_s": round(t_boot, 4),
                     "fit_series_s": round(t_all, 4),
                     "n_boot_converged": full.fit.n_boot, "A0": round(full.params["A0"], 5),
                     "A0_ci": [round(v, 5) for v in full.fit.ci["A0"]], "under_10s": t_all < 10})
    head = (f"{'series':10s} {'form':5s} {'fit (s)':>8s} {'1000 boot (s)':>14s} {'fit_series (s)':>15s} "
            f"{'A0':>8s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['series']:10s} {r['form']:5s} {r['fit_s']:8.3f} {r['bootstrap_s']:14.3f} "
              f"{r['fit_series_s']:15.3f} {r['A0']:8.4f}")
    record.write("fit_speed", rows, "cpu", method=f"best of {REPEATS} wall-clock runs; 40 evenly spaced "
                 "checkpoints, noise 5e-4", target="fit_series with 1000 resamples < 10 s",
                 load_average_1min=round(os.getloadavg()[0], 2))


if __name__ == "__main__":
    main()
