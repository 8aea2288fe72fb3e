"""The shape of a measured activation-ratio curve, judged against its own noise: the direction over the
whole run, and whether it turns (a minimum or maximum significantly inside the range).

The paper's laws are monotone and convergent; small runs need not be. A U-shaped ReLU curve (falls, then
rises) must be reported as such, and the law fitted only to the phase it describes. Everything here is a
plain rule on the measured points, so the verdicts built on it can be tested on synthetic curves.

Noise: the per-point standard deviation from second differences (robust to the smooth trend). A level is
the mean of `window` consecutive points, so its standard error is sd/sqrt(window); a difference of two
levels is significant when it exceeds `z` times its standard error sd*sqrt(2/window).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sparsinglaw.laws import _noise_sd

Z = 3.0  # a change counts when it exceeds 3 standard errors of the difference of two levels
WINDOW = 3  # points averaged into one level (start, end, turning point)
NOISE_FLOOR = 1e-4  # 0.01 points: keeps a noiseless synthetic curve from being judged on rounding


def _level(A: np.ndarray, i: int, window: int) -> float:
    """Mean of `window` points centred on index i (clipped to the curve)."""
    lo = max(0, min(i - window // 2, A.size - window))
    return float(A[lo:lo + window].mean())


def curve_shape(tokens: Any, ratio: Any, non_embedding_params: float | None = None, *,
                expected: str | None = None, z: float = Z, window: int = WINDOW) -> dict[str, Any]:
    """Direction over the run and turning points of one curve; every change with its +-z*se interval.

    Returns: noise_sd; start/end levels; change (end - start) with half_width; direction (falls / rises /
    flat within noise); turn and warmup, each None or {kind: minimum|maximum, index, tokens,
    tokens_per_param, ratio, before (start - turn level), after (end - turn level), half_width}. An
    extremum counts when the change into it and the change after it both exceed half_width and it lies
    at least `window` points from either end. With `expected` ("falls" for ReLU, "rises" for SiLU), an
    extremum that ends an opening move against the expected direction is the warm-up (the paper drops
    those checkpoints) and one that ends a move in the expected direction is the turn; without it, the
    first significant extremum is the turn.
    """
    D = np.asarray(tokens, dtype=float)
    A = np.asarray(ratio, dtype=float)
    n = A.size
    sd = max(_noise_sd(A), NOISE_FLOOR)
    w = max(1, min(window, n // 3))
    hw = z * sd * math.sqrt(2 / w)
    start, end = _level(A, 0, w), _level(A, n - 1, w)
    change = end - start
    direction = "flat within noise" if abs(change) <= hw else ("rises" if change > 0 else "falls")
    out: dict[str, Any] = {"noise_sd": sd, "start": start, "end": end, "change": change, "half_width": hw,
                           "direction": direction, "turn": None, "warmup": None, "points": n, "z": z}
    if n < 3 * w:
        return out
    smooth = np.convolve(A, np.ones(w) / w, mode="valid")  # smooth[j] = level centred on j + w // 2
    found = []
    for kind, j in (("minimum", int(np.argmin(smooth))), ("maximum", int(np.argmax(smooth)))):
        i = j + w // 2
        if i < w or i > n - 1 - w:
            continue
        lvl = float(smooth[j])
        sign = 1 if kind == "minimum" else -1
        if sign * (start - lvl) > hw and sign * (end - lvl) > hw:
            found.append({"kind": kind, "index": i, "tokens": float(D[i]), "ratio": lvl,
                          "tokens_per_param": float(D[i] / non_embedding_params) if non_embedding_params
                          else None, "before": start - lvl, "after": end - lvl, "half_width": hw})
    for t in sorted(found, key=lambda t: t["index"]):
        # a minimum ends a fall, a maximum ends a rise
        ends_expected = expected is None or (t["kind"] == "minimum") == (expected == "falls")
        key = "turn" if ends_expected else "warmup"
        if out[key] is None:
            out[key] = t
    return out


def describe(shape: dict[str, Any], pct: bool = True) -> str:
    """One line: direction with its interval, and the turn if there is one."""
    f = (lambda x: f"{100 * x:.2f}%") if pct else (lambda x: f"{x:.4g}")
    p = (lambda x: f"{100 * x:+.2f}") if pct else (lambda x: f"{x:+.4g}")
    hw = f" ± {100 * shape['half_width']:.2f}" if pct else f" ± {shape['half_width']:.3g}"
    s = f"{shape['direction']} {f(shape['start'])} -> {f(shape['end'])} ({p(shape['change'])}{hw} points)"
    w = shape.get("warmup")
    if w:
        s += f"; early {w['kind']} {f(w['ratio'])} at {w['tokens'] / 1e6:.3g}M tokens (warm-up)"
    t = shape.get("turn")
    if t:
        tpp = f", {t['tokens_per_param']:.0f} tokens/param" if t.get("tokens_per_param") else ""
        s += (f"; {t['kind']} {f(t['ratio'])} at {t['tokens'] / 1e6:.3g}M tokens{tpp}, "
              f"{p(t['after'])}{hw} points after it")
    return s
