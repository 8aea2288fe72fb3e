"""Laws of activation ratio versus training data and versus width-depth ratio (docs/science.md).

Why this module exists: the paper's own fits needed hand-picked starting points and moved a lot with how
many warm-up checkpoints were dropped. Here every form is fitted from a data-driven grid of starts (each
start solves the linear part of the law in closed form), refined with bounded least squares, compared by
SSE/MSE/MAE/AIC/BIC, and given bootstrap intervals. The bootstrap refits all resamples at once with a
batched Levenberg-Marquardt in numpy, so 1,000 resamples cost a fraction of a second.

Conventions: `tokens` are raw token counts; every law works on D = tokens / 1e9 (billions). A form that
cannot be fitted is returned as data (`success=False, message=...`); bad user input raises `UserError`.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import least_squares
from scipy.special import expit

from sparsinglaw.errors import UserError

TOKENS_PER_BILLION = 1e9
LAW_FORMS = ("relu", "silu")
BASELINE_FORMS = ("log", "sigmoid")
FORMS = LAW_FORMS + BASELINE_FORMS
_META_KEYS = ("name", "activation", "non_embedding_params", "width", "depth")
_EXP_CLIP = 700.0


# ----------------------------------------------------------------------------------------------------------
# Series: loading and validation
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Series:
    """One activation-ratio curve: raw token counts, ratios in (0, 1) and optional metadata."""

    tokens: np.ndarray
    activation_ratio: np.ndarray
    name: str = "series"
    activation: str | None = None
    non_embedding_params: float | None = None
    width: int | None = None
    depth: int | None = None
    source: str | None = None
    sigma: np.ndarray | None = None  # each point's standard deviation (`track`'s activation_ratio_sigma)

    def __post_init__(self) -> None:
        self.tokens, self.activation_ratio = validate_series(self.tokens, self.activation_ratio, self.name)

    @property
    def D(self) -> np.ndarray:
        """Training data in billions of tokens, the unit every law uses."""
        return self.tokens / TOKENS_PER_BILLION

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "activation": self.activation,
                "non_embedding_params": self.non_embedding_params, "width": self.width, "depth": self.depth,
                "source": self.source, "tokens": self.tokens.tolist(),
                "activation_ratio": self.activation_ratio.tolist()}


def validate_series(tokens: Any, ratio: Any, name: str = "series") -> tuple[np.ndarray, np.ndarray]:
    """Check a curve and return float arrays; every problem is one UserError line that says the fix."""
    try:
        t = np.asarray(tokens, dtype=float).reshape(-1)
        a = np.asarray(ratio, dtype=float).reshape(-1)
    except (TypeError, ValueError) as e:
        raise UserError(f"{name}: tokens and activation_ratio must be lists of numbers ({e})") from None
    if t.size != a.size:
        raise UserError(f"{name}: tokens has {t.size} values but activation_ratio has {a.size}; "
                        "give one ratio per checkpoint")
    if t.size < 3:
        raise UserError(f"{name}: {t.size} points is too few to fit a law; give at least 3 checkpoints "
                        "(5 for the ReLU law, 20-40 for trustworthy intervals)")
    for label, v in (("tokens", t), ("activation_ratio", a)):
        bad = np.flatnonzero(~np.isfinite(v))
        if bad.size:
            raise UserError(f"{name}: {label}[{bad[0]}] is {v[bad[0]]} (NaN or infinite); remove that "
                            "checkpoint or re-measure it")
    bad = np.flatnonzero(t <= 0)
    if bad.size:
        raise UserError(f"{name}: tokens[{bad[0]}] = {t[bad[0]]:g} is not positive; tokens are the raw "
                        "number of training tokens seen at each checkpoint (> 0)")
    bad = np.flatnonzero((a <= 0) | (a >= 1))
    if bad.size:
        hint = "; divide percentages by 100" if a[bad[0]] > 1 else ""
        raise UserError(f"{name}: activation_ratio[{bad[0]}] = {a[bad[0]]:g} is outside (0, 1); ratios are "
                        f"fractions of neurons kept (0.0614 for 6.14%){hint}")
    bad = np.flatnonzero(np.diff(t) <= 0)
    if bad.size:
        i = bad[0] + 1
        what = "duplicated" if t[i] == t[i - 1] else "unsorted"
        raise UserError(f"{name}: tokens are {what}: tokens[{i}] = {t[i]:g} <= tokens[{i - 1}] = "
                        f"{t[i - 1]:g}; "
                        "sort checkpoints by tokens and keep one measurement per checkpoint")
    return t, a


def _pick_meta(obj: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for nest in ("metadata", "meta", "config"):
        if isinstance(obj.get(nest), dict):
            meta.update({k: obj[nest][k] for k in _META_KEYS if obj[nest].get(k) is not None})
    meta.update({k: obj[k] for k in _META_KEYS if obj.get(k) is not None and not isinstance(obj[k], dict)})
    return meta


def _default_name(path: Path) -> str:
    # a tracked run writes runs/<run>/series.json: the run folder names it
    return path.parent.name if path.stem == "series" and path.parent.name else path.stem


def load_series(path: str | os.PathLike) -> Series:
    """Read a series from JSON (tokens, activation_ratio, optional metadata; other keys ignored) or CSV."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; give a series .json or .csv with tokens and activation_ratio")
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        cols = {c.strip().lower(): c for c in (rows[0].keys() if rows else [])}
        if "tokens" not in cols or "activation_ratio" not in cols:
            raise UserError(f"{path}: CSV needs a header with columns tokens,activation_ratio "
                            f"(found: {', '.join(cols) or 'none'})")
        try:
            tokens = [float(r[cols["tokens"]]) for r in rows]
            ratio = [float(r[cols["activation_ratio"]]) for r in rows]
        except (TypeError, ValueError) as e:
            raise UserError(f"{path}: a tokens or activation_ratio cell is not a number ({e})") from None
        meta: dict[str, Any] = {}
        sigma = None
    else:
        try:
            obj = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(obj, dict) or "tokens" not in obj or "activation_ratio" not in obj:
            raise UserError(f"{path}: expected a JSON object with keys 'tokens' and 'activation_ratio'")
        tokens, ratio = obj["tokens"], obj["activation_ratio"]
        if any(v is None for v in list(tokens) + list(ratio)):
            raise UserError(f"{path}: tokens or activation_ratio contains null; remove unmeasured "
                            "checkpoints")
        meta = _pick_meta(obj)
        sig = obj.get("activation_ratio_sigma")
        sigma = (np.asarray(sig, dtype=float) if isinstance(sig, list) and len(sig) == len(ratio)
                 and all(isinstance(v, (int, float)) and v > 0 for v in sig) else None)
    name = str(meta.pop("name", _default_name(path)))
    try:
        params = float(meta["non_embedding_params"]) if "non_embedding_params" in meta else None
        width = int(meta["width"]) if "width" in meta else None
        depth = int(meta["depth"]) if "depth" in meta else None
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: metadata non_embedding_params/width/depth must be numbers ({e})") from None
    act = str(meta["activation"]).lower() if "activation" in meta else None
    return Series(tokens=tokens, activation_ratio=ratio, name=name, activation=act, sigma=sigma,
                  non_embedding_params=params, width=width, depth=depth, source=str(path))


# ----------------------------------------------------------------------------------------------------------
# Forms: a registry of law shapes, each with vectorised value, Jacobian, inverse and starting grid
# ----------------------------------------------------------------------------------------------------------
# Every form works on an internal parameter vector theta (log-scaled where the public value spans decades)
# and maps it to the public parameters the paper reports. All functions broadcast over a leading batch axis:
# theta has shape (..., k), D has shape (n,), values have shape (..., n).


@dataclass(frozen=True)
class Form:
    """A law shape: `value(theta, D)`, `jac`, `deriv` (dA/dD), `invert` (D at a ratio), bounds and starts."""

    name: str
    formula: str
    internal: tuple[str, ...]
    public: tuple[str, ...]
    value: Callable[[np.ndarray, np.ndarray], np.ndarray]
    jac: Callable[[np.ndarray, np.ndarray], np.ndarray]
    deriv: Callable[[np.ndarray, np.ndarray], np.ndarray]
    invert: Callable[[np.ndarray, float], np.ndarray]
    to_public: Callable[[np.ndarray], np.ndarray]
    bounds: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
    starts: Callable[[np.ndarray, np.ndarray], np.ndarray]
    note: str = ""

    @property
    def k(self) -> int:
        """Number of free parameters (what AIC and BIC count)."""
        return len(self.internal)


def _t(theta: np.ndarray, i: int) -> np.ndarray:
    return np.asarray(theta)[..., i : i + 1]


def _linfit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares line y = p + q x; returns (p, q, sse). Used to solve each start's linear part."""
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    q = float(((x - xm) * (y - ym)).sum() / sxx) if sxx > 0 else 0.0
    p = float(ym - q * xm)
    return p, q, float(((y - p - q * x) ** 2).sum())


# --- ReLU logspace power law: A = exp(-c D^alpha + b) + A0 -------------------------------------------------
# Fitted as A = exp(b' - beta * (D^alpha - 1)/alpha) + A0 with b' = b - c and beta = c * alpha: the same
# curve, but as alpha -> 0 it tends to the power law A0 + K D^-beta at a finite point instead of running off
# to b, c -> infinity (the valley that made the published fits fragile). Internal (alpha, b', ln beta, A0).


def _boxcox(al: np.ndarray, lnD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(D^alpha - 1)/alpha and its derivative in alpha, stable for small alpha * ln D."""
    z = al * lnD
    small = np.abs(z) < 1e-4
    zs = np.where(small, 1.0, z)
    bc = np.where(small, lnD * (1 + z / 2 + z * z / 6), np.expm1(zs) / np.where(small, 1.0, al))
    dz = np.where(small, 0.5 + z / 3 + z * z / 8, (zs * np.exp(zs) - np.expm1(zs)) / (zs * zs))
    return bc, lnD * lnD * dz


def _relu_parts(theta: np.ndarray, D: np.ndarray) -> tuple[np.ndarray, ...]:
    al, bp, lbeta, a0 = (_t(theta, i) for i in range(4))
    bc, dbc = _boxcox(al, np.log(D))
    beta = np.exp(lbeta)
    E = np.exp(np.clip(bp - beta * bc, -_EXP_CLIP, _EXP_CLIP))
    return al, beta, a0, bc, dbc, E


def _relu_value(theta: np.ndarray, D: np.ndarray) -> np.ndarray:
    *_, a0, _bc, _dbc, E = _relu_parts(theta, D)
    return E + a0


def _relu_jac(theta: np.ndarray, D: np.ndarray) -> np.ndarray:
    _al, beta, a0, bc, dbc, E = _relu_parts(theta, D)
    return np.stack([-E * beta * dbc, E, -E * beta * bc, np.ones_like(E + a0)], axis=-1)


def _relu_deriv(theta: np.ndarray, D: np.ndarray) -> np.ndarray:
    al, beta, _a0, _bc, _dbc, E = _relu_parts(theta, D)
    return -E * beta * D ** (al - 1)


def _relu_invert(theta: np.ndarray, target: float) -> np.ndarray:
    al, bp, lbeta, a0 = (np.asarray(theta)[..., i] for i in range(4))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        bc = (bp - np.log(target - a0)) / np.exp(lbeta)
        w = 1 + al * bc
        d = np.where(w > 0, np.exp(np.log1p(np.maximum(al * bc, -1 + 1e-300)) / al), 0.0)
    return np.where(target > a0, d, np.inf)


def _relu_starts(D: np.ndarray, A: np.ndarray) -> np.ndarray:
    lo, span = float(A.min()), float(np.ptp(A)) or 1e-3
    lnD = np.log(D)
    out = []
    for frac in (0.02, 0.1, 0.3, 0.7, 1.5, 3.0, 8.0):
        a0 = lo - frac * span
        if a0 <= 1e-6:
            a0 = lo * 0.5
        y = np.log(A - a0)
        for al in (1e-3, 0.1, 0.2, 0.35, 0.5, 0.7, 1.0, 1.3, 1.7, 2.5):
            bp, q, sse = _linfit(_boxcox(np.float64(al), lnD)[0], y)
            if q < 0:  # ln(A - A0) = b' - beta * boxcox(D) needs beta > 0
                out.append((sse, (al, bp, math.log(-q), a0)))
    return _best_starts(out, fallback=(0.5, float(np.log(span)), 0.0, max(lo - span, 1e-3)))


def _relu_bounds(D: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.array([1e-4, -50.0, -40.0, 1e-6]), np.array([6.0, 50.0, 10.0, 1 - 1e-6])


# --- SiLU power law: A = -c D^(-alpha) + A0; internal (alpha, ln c, A0) -----------------------------------


def _silu_value(theta: np.ndarray, D: np.ndarray) -> np.ndarray:
    al, lc, a0 = (_t(theta, i) for i in range(3))
    return a0 - np.exp(lc) * D ** (-al)


def _silu_jac(theta: np.ndarray, D: np.ndarray) -> np.ndarray:
    al, lc, a0 = (_t(theta, i) for i in range(3))
    cu = np.exp(lc) * D ** (-al)
    return np.stack([cu * np.log(D), -cu, np.ones_like(cu)], axis=-1)


def _silu_deriv(theta: np.ndarray, D: np.ndarray) -> np.ndarray:
    al, lc, _ = (_t(theta, i) for i in range(3))
    return np.exp(lc) * al * D ** (-al - 1)


def _silu_invert(theta: np.ndarray, target: float) -> np.ndarray:
    al, lc, a0 = (np.asarray(theta)[..., i] for i in range(3))
    with np.errstate(invalid="ignore", divide="ignore"):
        d = (np.exp(lc) / np.abs(a0 - target)) ** (1.0 / al)
    return np.where(target < a0, d, np.inf)


def _silu_starts(D: np.ndarray, A: np.ndarray) -> np.ndarray:
    hi, span = float(A.max()), float(np.ptp(A)) or 1e-3
    out = []
    for frac in (0.01, 0.03, 0.1, 0.3, 0.7, 1.5, 3.0, 8.0):
        a0 = min(hi + frac * span, 1 - 1e-6)
        if a0 <= hi:
            continue
        lc, q, sse = _linfit(np.log(D), np.log(a0 - A))  # ln(A0 - A) = ln c - alpha ln D
        if q < 0:
            out.append((sse, (-q, lc, a0)))
    return _best_starts(out, fallback=(0.5, float(np.log(span)), min(hi + span, 1 - 1e-6)))


def _silu_bounds(D: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.array([1e-3, -40.0, 1e-6]), np.array([6.0, 15.0, 1 - 1e-6])


# --- logarithmic baseline: A = c log(a D + b) + A0 with a fixed at 1; internal (b, c, A0) -----------------
# c log(aD + b) + A0 = c log(D + b/a) + (A0 + c log a): a and A0 are one degree of freedom, so a = 1.


def _log_value(theta: np.ndarray, D: np.ndarray) -> np.ndarray:
    b, c, a0 = (_t(theta, i) for i in range(3))
    return c * np.log(np.maximum(D + b, 1e-300)) + a0


def _log_jac(theta: np.ndarray, D: np.ndarray) -> np.ndarray:
    b, c, a0 = (_t(theta, i) for i in range(3))
    x = np.maximum(D + b, 1e-300)
    return np.stack([c / x, np.log(x) + 0 * c, np.ones_like(x + c)], axis=-1)


def _log_deriv(theta: np.ndarray, D: np.ndarray) -> np.ndarray:
    b, c, _ = (_t(theta, i) for i in range(3))
    return c / np.maximum(D + b, 1e-300)


def _log_invert(theta: np.ndarray, target: float) -> np.ndarray:
    b, c, a0 = (np.asarray(theta)[..., i] for i in range(3))
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        d = np.exp(np.clip((target - a0) / c, -_EXP_CLIP, _EXP_CLIP)) - b
    return np.where((c != 0) & (d > 0), d, np.inf)


def _log_starts(D: np.ndarray, A: np.ndarray) -> np.ndarray:
    dmin = float(D.min())
    out = []
    for s in np.geomspace(max(dmin, 1e-9) * 1e-3, max(float(D.max()), 1e-9) * 10, 25):
        for b in (s, -0.9 * dmin if s == dmin * 1e-3 else s):
            a0, c, sse = _linfit(np.log(D + b), A)
            out.append((sse, (b, c, a0)))
    return _best_starts(out, fallback=(1.0, 0.0, float(A.mean())))


def _log_bounds(D: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.array([-0.999 * float(D.min()), -10.0, -10.0]), np.array([1e6, 10.0, 10.0])


# --- sigmoid-like baseline: A = a - 1/(1 + b exp(c D + d)) with d fixed at 0; internal (a, ln b, c) -------
# b exp(cD + d) = exp(ln b + d + cD): b and d are one degree of freedom, so d = 0.


def _sig_s(theta: np.ndarray, D: np.ndarray) -> np.ndarray:
    _, lb, c = (_t(theta, i) for i in range(3))
    return expit(-(lb + c * D))


def _sig_value(theta: np.ndarray, D: np.ndarray) -> np.ndarray:
    return _t(theta, 0) - _sig_s(theta, D)


def _sig_jac(theta: np.ndarray, D: np.ndarray) -> np.ndarray:
    s = _sig_s(theta, D)
    g = s * (1 - s)
    return np.stack([np.ones_like(s), g, g * D], axis=-1)


def _sig_deriv(theta: np.ndarray, D: np.ndarray) -> np.ndarray:
    s = _sig_s(theta, D)
    return s * (1 - s) * _t(theta, 2)


def _sig_invert(theta: np.ndarray, target: float) -> np.ndarray:
    a, lb, c = (np.asarray(theta)[..., i] for i in range(3))
    s = a - target
    with np.errstate(divide="ignore", invalid="ignore"):
        d = (np.log(1.0 / s - 1.0) - lb) / c
    return np.where((s > 0) & (s < 1) & (c != 0) & (d > 0), d, np.inf)


def _sig_starts(D: np.ndarray, A: np.ndarray) -> np.ndarray:
    lo, hi, span = float(A.min()), float(A.max()), float(np.ptp(A)) or 1e-3
    cands = [hi + f * span for f in (0.01, 0.05, 0.2, 0.5, 1, 3)]
    cands += [lo + 1 - f * span for f in (0.01, 0.05, 0.2, 0.5, 1, 3)]
    cands += list(np.linspace(hi + 1e-4, lo + 1 - 1e-4, 12))
    out = []
    for a in cands:
        s = a - A
        if s.min() <= 0 or s.max() >= 1:
            continue
        lb, c, sse = _linfit(D, np.log(1.0 / s - 1.0))  # ln(1/s - 1) = ln b + c D
        w = (s * (1 - s)) ** 2  # map the linearised error back to the ratio scale
        out.append((sse * float(w.mean()), (a, lb, c)))
    return _best_starts(out, fallback=(hi + 0.5, 0.0, 0.0))


def _sig_bounds(D: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cmax = 200.0 / max(float(D.max()), 1e-12)
    return np.array([-1.0, -100.0, -cmax]), np.array([2.0, 100.0, cmax])


def _best_starts(cands: list[tuple[float, tuple[float, ...]]], fallback: tuple[float, ...],
                 keep: int = 6) -> np.ndarray:
    good = sorted((c for c in cands if np.isfinite(c[0]) and np.all(np.isfinite(c[1]))), key=lambda c: c[0])
    rows = [c[1] for c in good[:keep]] or [fallback]
    return np.array(rows, dtype=float)



def _relu_public(theta: np.ndarray) -> np.ndarray:
    t = np.array(theta, dtype=float)
    c = np.exp(t[..., 2]) / t[..., 0]  # c = beta / alpha, b = b' + c
    t[..., 1] = t[..., 1] + c
    t[..., 2] = c
    return t


def _silu_public(theta: np.ndarray) -> np.ndarray:
    t = np.array(theta, dtype=float)
    t[..., 1] = np.exp(t[..., 1])
    return t


def _log_public(theta: np.ndarray) -> np.ndarray:
    t = np.asarray(theta, dtype=float)
    return np.concatenate([np.ones_like(t[..., :1]), t], axis=-1)  # (a=1, b, c, A0)


def _sig_public(theta: np.ndarray) -> np.ndarray:
    t = np.array(theta, dtype=float)
    t[..., 1] = np.exp(t[..., 1])
    return np.concatenate([t, np.zeros_like(t[..., :1])], axis=-1)  # (a, b, c, d=0)


REGISTRY: dict[str, Form] = {
    "relu": Form("relu", "A = exp(-c*D^alpha + b) + A0", ("alpha", "b_minus_c", "ln_beta", "A0"),
                 ("alpha", "b", "c", "A0"),
                 _relu_value, _relu_jac, _relu_deriv, _relu_invert, _relu_public, _relu_bounds, _relu_starts),
    "silu": Form("silu", "A = -c*D^(-alpha) + A0", ("alpha", "ln_c", "A0"), ("alpha", "c", "A0"),
                 _silu_value, _silu_jac, _silu_deriv, _silu_invert, _silu_public, _silu_bounds, _silu_starts),
    "log": Form("log", "A = c*log(a*D + b) + A0", ("b", "c", "A0"), ("a", "b", "c", "A0"),
                _log_value, _log_jac, _log_deriv, _log_invert, _log_public, _log_bounds, _log_starts,
                note="a is fixed at 1: a and A0 are not separately identifiable"),
    "sigmoid": Form("sigmoid", "A = a - 1/(1 + b*exp(c*D + d))", ("a", "ln_b", "c"), ("a", "b", "c", "d"),
                    _sig_value, _sig_jac, _sig_deriv, _sig_invert, _sig_public, _sig_bounds, _sig_starts,
                    note="d is fixed at 0: b and d are not separately identifiable"),
}


def get_form(name: str) -> Form:
    """Look a form up by name; an unknown name is a UserError listing the choices."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown form {name!r}; choose one of auto, {', '.join(REGISTRY)}") from None


# ----------------------------------------------------------------------------------------------------------
# Fitting one form
# ----------------------------------------------------------------------------------------------------------


def _criteria(sse: float, absres: float, n: int, k: int) -> dict[str, float]:
    s = max(sse, 1e-300)
    return {"sse": sse, "mse": sse / n, "mae": absres / n,
            "aic": n * math.log(s / n) + 2 * k, "bic": n * math.log(s / n) + k * math.log(n)}


def _polish(form: Form, D: np.ndarray, A: np.ndarray, x0: np.ndarray, lo: np.ndarray,
            hi: np.ndarray, wt: np.ndarray | None = None) -> tuple[np.ndarray, float, bool, str]:
    """Bounded trust-region least squares from one start; returns (theta, sse, converged, message).
    wt: per-point weights on the residuals (1 / sigma: a weighted fit); sse is then weighted too."""
    x0 = np.clip(x0, lo + 1e-9 * (hi - lo), hi - 1e-9 * (hi - lo))
    w = np.ones_like(A) if wt is None else wt

    def res(x: np.ndarray) -> np.ndarray:
        return (form.value(x, D) - A) * w

    def jac(x: np.ndarray) -> np.ndarray:
        return form.jac(x, D) * w[:, None]

    with np.errstate(all="ignore"):
        r = least_squares(res, x0, jac=jac, bounds=(lo, hi), method="trf", x_scale="jac",
                          ftol=1e-10, xtol=1e-10, gtol=1e-10, max_nfev=1000)
    sse = float(np.sum(r.fun**2)) if np.all(np.isfinite(r.fun)) else math.inf
    return r.x, sse, bool(r.status > 0), str(r.message)


@dataclass
class FormFit:
    """One form fitted to one curve, in the style of scipy's OptimizeResult.

    Fields: `form`, `formula`; `success` and `message` (why a form failed: failures are data);
    `params` (public names: alpha, b, c, A0 for ReLU; alpha, c, A0 for SiLU; a, b, c, A0 for log;
    a, b, c, d for sigmoid); `n` points and `k` free parameters; `sse`, `mse`, `mae`, `aic`, `bic`
    (AIC = n ln(SSE/n) + 2k, BIC = n ln(SSE/n) + k ln n); `converged` (False: the best start hit the
    evaluation limit, still usable but flagged); `ci` (bootstrap percentile interval for
    every parameter, [lo, hi] at `level`); `n_boot` resamples that converged; `theta` (internal vector)
    and `boot_theta` (internal vectors of the resamples) for forecasts.
    """

    form: str
    success: bool
    message: str
    formula: str = ""
    params: dict[str, float] = field(default_factory=dict)
    n: int = 0
    k: int = 0
    sse: float = math.nan
    mse: float = math.nan
    mae: float = math.nan
    aic: float = math.nan
    bic: float = math.nan
    ci: dict[str, list[float]] = field(default_factory=dict)
    level: float = 0.95
    n_boot: int = 0
    converged: bool = False
    theta: np.ndarray | None = field(default=None, repr=False)
    boot_theta: np.ndarray | None = field(default=None, repr=False)
    boot_noise: np.ndarray | None = field(default=None, repr=False)

    def predict(self, D: Any) -> np.ndarray:
        """Activation ratio at D billions of tokens."""
        if not self.success or self.theta is None:
            raise UserError(f"the {self.form} form has no fit to predict from: {self.message}")
        return REGISTRY[self.form].value(self.theta, np.asarray(D, dtype=float))

    def to_json(self) -> dict[str, Any]:
        return {"form": self.form, "formula": self.formula, "success": self.success, "message": self.message,
                "converged": self.converged, "params": self.params, "n": self.n, "k": self.k,
                "sse": _num(self.sse), "mse": _num(self.mse),
                "mae": _num(self.mae), "aic": _num(self.aic), "bic": _num(self.bic), "ci": self.ci,
                "level": self.level, "n_boot": self.n_boot}


def _num(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def fit_form(form: str, D: Any, A: Any, *, bootstrap: int = 0, level: float = 0.95, seed: int = 0,
             sigma: Any = None) -> FormFit:
    """Fit one form to (D in billions, A) with grid starts and bounded least squares; optional bootstrap.

    `sigma`: each point's standard deviation (a tracked series' `activation_ratio_sigma`): residuals are
    weighted by 1 / sigma in the fit and the bootstrap (criteria stay on the unweighted residuals).

    Returns a FormFit with `success=False` and a message when the form cannot be fitted (too few points,
    no finite start, or no start converged) rather than raising, so a caller can compare what did fit.
    """
    f = get_form(form)
    D = np.asarray(D, dtype=float)
    A = np.asarray(A, dtype=float)
    n, k = D.size, f.k
    base = {"form": form, "formula": f.formula, "n": n, "k": k, "level": level}
    if n < k + 1:
        return FormFit(success=False, message=f"needs at least {k + 1} points for {k} parameters, has {n}",
                       **base)
    lo, hi = f.bounds(D, A)
    wt = _weights(sigma, n)
    with np.errstate(all="ignore"):
        starts = f.starts(D, A)
    cands = []
    for x0 in starts:
        try:
            cands.append(_polish(f, D, A, x0, lo, hi, wt))
        except (ValueError, FloatingPointError, np.linalg.LinAlgError) as e:
            cands.append((x0, math.inf, False, str(e)))
    finite = [c for c in cands if math.isfinite(c[1])]
    if not finite:
        return FormFit(success=False, message=f"no start gave a finite fit ({cands[0][3]})", **base)
    top = min(c[1] for c in finite)
    # prefer a start that converged when it is as good as the best one that ran out of evaluations
    conv = [c for c in finite if c[2] and c[1] <= top * (1 + 1e-6) + 1e-18]
    theta, sse, converged, msg = min(conv or finite, key=lambda c: c[1])
    if converged:
        message = f"converged (best of {len(starts)} starts)"
    else:
        message = (f"stopped before converging ({msg}); best of {len(starts)} starts, likely along a flat "
                   "direction of the law, so some parameters are poorly determined")
    resid = f.value(theta, D) - A
    pub = f.to_public(theta)
    out = FormFit(success=True, message=message + (f"; {f.note}" if f.note else "")
                  + ("; weighted by 1/sigma" if wt is not None else ""), converged=converged,
                  params={p: float(v) for p, v in zip(f.public, pub, strict=True)}, theta=theta,
                  **_criteria(float(np.sum(resid**2)), float(np.abs(resid).sum()), n, k), **base)
    if bootstrap > 0:
        _bootstrap(out, f, D, A, bootstrap, level, seed, wt)
    return out


def _weights(sigma: Any, n: int) -> np.ndarray | None:
    """1 / sigma, normalised to mean 1 (None: unweighted); a clear error for unusable sigmas."""
    if sigma is None:
        return None
    sg = np.asarray(sigma, dtype=float)
    if sg.shape != (n,) or not np.all(np.isfinite(sg)) or np.any(sg <= 0):
        raise UserError(f"a weighted fit needs one positive, finite sigma per point ({n}); got {sg.tolist()}")
    wt = 1.0 / sg
    return wt / wt.mean()


# ----------------------------------------------------------------------------------------------------------
# Bootstrap: all resamples refitted together by a batched Levenberg-Marquardt
# ----------------------------------------------------------------------------------------------------------


def _batched_lm(f: Form, theta0: np.ndarray, D: np.ndarray, Y: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                iters: int = 200, tol: float = 1e-12, wt: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Minimise ||wt (f(theta_b, D) - Y_b)||^2 for every row b at once (projected onto the bounds).

    Why: scipy refits one problem per call; for 1,000 resamples of a small curve the Python overhead
    dominates. Here each iteration is a few (B, n, k) array operations and a batched k x k solve.
    """
    th = np.clip(theta0.copy(), lo, hi)
    B, k = th.shape
    w = np.ones(D.size) if wt is None else wt
    with np.errstate(all="ignore"):
        r = (f.value(th, D) - Y) * w
        sse = np.einsum("bn,bn->b", r, r)
        lam = np.full(B, 1e-3)
        active = np.isfinite(sse)
        eye = np.eye(k)
        for _ in range(iters):
            idx = np.flatnonzero(active)
            if idx.size == 0:
                break
            t, rr = th[idx], r[idx]
            J = f.jac(t, D) * w[:, None]
            g = np.einsum("bnk,bn->bk", J, rr)
            H = np.einsum("bnk,bnj->bkj", J, J)
            # active set: a parameter on a bound that the gradient pushes outward is held there
            span = (hi - lo) * 1e-12
            hold = ((t <= lo + span) & (g > 0)) | ((t >= hi - span) & (g < 0))
            if hold.any():
                free = (~hold).astype(float)
                g = g * free
                H = H * free[:, :, None] * free[:, None, :] + hold[:, :, None] * eye
            dg = np.einsum("bkk->bk", H)
            Hd = H + (lam[idx, None] * (dg + 1e-12))[:, :, None] * eye
            try:
                step = -np.linalg.solve(Hd, g[..., None])[..., 0]
            except np.linalg.LinAlgError:
                step = -g / (np.einsum("bkk->bk", Hd) + 1e-30)
            new = np.clip(t + step, lo, hi)
            rn = (f.value(new, D) - Y[idx]) * w
            sn = np.einsum("bn,bn->b", rn, rn)
            ok = np.isfinite(sn) & (sn <= sse[idx])
            gain = np.where(ok, (sse[idx] - sn) / np.maximum(sse[idx], 1e-300), 0.0)
            acc = idx[ok]
            th[acc], r[acc], sse[acc] = new[ok], rn[ok], sn[ok]
            lam[idx] = np.where(ok, lam[idx] * 0.3, lam[idx] * 8.0)
            lam = np.clip(lam, 1e-12, 1e12)
            done = (ok & (gain < tol) & (np.abs(step).max(axis=1) < 1e-10 + 1e-8 * np.abs(t).max(axis=1))) | (
                ~ok & (lam[idx] >= 1e12))
            done |= ok & (gain < tol * 1e-3)
            active[idx[done]] = False
    return th, sse


def _bootstrap(out: FormFit, f: Form, D: np.ndarray, A: np.ndarray, B: int, level: float, seed: int,
               wt: np.ndarray | None = None) -> None:
    """Residual bootstrap: resample centred, df-corrected residuals onto the fitted curve and refit. With
    weights, the standardised residuals (residual x weight) are resampled and put back at each point's
    own scale."""
    rng = np.random.default_rng(seed)
    fitted = f.value(out.theta, D)
    w = np.ones(D.size) if wt is None else wt
    res = (A - fitted) * w
    n, k = D.size, f.k
    res = (res - res.mean()) * math.sqrt(n / max(n - k, 1))
    Y = fitted[None, :] + res[rng.integers(0, n, size=(B, n))] / w
    lo, hi = f.bounds(D, A)
    th, sse = _batched_lm(f, np.tile(out.theta, (B, 1)), D, Y, lo, hi, wt=wt)
    # the few resamples the batched solver handled badly get scipy's refit from the full-data optimum
    med = np.nanmedian(sse[np.isfinite(sse)]) if np.isfinite(sse).any() else math.inf
    redo = np.flatnonzero(~np.isfinite(sse) | (sse > 10 * med))[:100]
    for i in redo:
        x, s, _, _ = _polish(f, D, Y[i], out.theta, lo, hi, wt)
        if s < sse[i] or not np.isfinite(sse[i]):
            th[i], sse[i] = x, s
    good = np.isfinite(sse) & np.all(np.isfinite(th), axis=1)
    th = th[good]
    out.boot_theta, out.n_boot, out.boot_noise = th, int(good.sum()), res
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    pub = f.to_public(th)
    out.ci = {p: [float(v) for v in np.percentile(pub[:, j], q)] for j, p in enumerate(f.public)}


def _interval(f: Form, fit: FormFit, D: np.ndarray, level: float, noise: bool,
              seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap band at D: confidence band of the curve, or prediction band (curve plus a new residual)."""
    if fit.boot_theta is None or fit.boot_theta.shape[0] < 2:
        v = fit.predict(D)
        return v, v
    with np.errstate(all="ignore"):
        V = f.value(fit.boot_theta, D)
    if noise and fit.boot_noise is not None:
        rng = np.random.default_rng(seed)
        V = V + fit.boot_noise[rng.integers(0, fit.boot_noise.size, size=V.shape)]
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    lo, hi = np.nanpercentile(V, q, axis=0)
    return lo, hi


# ----------------------------------------------------------------------------------------------------------
# Early points
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Dropped:
    """A checkpoint left out of the fit, and why (nothing is dropped silently)."""

    index: int
    tokens: float
    activation_ratio: float
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "tokens": self.tokens, "activation_ratio": self.activation_ratio,
                "reason": self.reason}


def _noise_sd(A: np.ndarray) -> float:
    """Robust noise estimate from second differences (insensitive to the smooth trend)."""
    if A.size < 4:
        return 0.0
    d2 = np.diff(A, 2)
    return float(1.4826 * np.median(np.abs(d2 - np.median(d2))) / math.sqrt(6))


def _direction(D: np.ndarray, A: np.ndarray, activation: str | None = None) -> tuple[int, str]:
    """+1 if the ratio rises with data, -1 if it falls.

    Judged on the later two thirds (middle third against last third, medians) so that warm-up
    checkpoints at the start cannot flip it; when that change is within noise, the activation named in
    the metadata decides, else the sign of the overall slope against ln D.
    """
    n = A.size
    mid, last = float(np.median(A[n // 3 : 2 * n // 3 or None])), float(np.median(A[2 * n // 3 :]))
    diff = last - mid
    word = lambda d: "falls" if d < 0 else "rises"  # noqa: E731
    if abs(diff) > 3 * _noise_sd(A) and diff != 0:
        d = 1 if diff > 0 else -1
        return d, (f"the ratio {word(d)} with data (median {mid:.4f} in the middle third, {last:.4f} "
                   "in the last)")
    if activation in LAW_FORMS:
        d = -1 if activation == "relu" else 1
        return d, f"the trend is within noise, so the metadata's activation={activation} decides"
    _, slope, _ = _linfit(np.log(D), A)
    d = 1 if slope > 0 else -1
    return d, f"the trend is within noise; the overall slope against ln D says the ratio {word(d)}"


def auto_drop_early(D: np.ndarray, A: np.ndarray, form: str, *, max_frac: float = 1 / 3,
                    threshold: float = 4.0) -> list[tuple[int, str]]:
    """Find leading warm-up checkpoints that the law cannot accommodate; returns (position, reason) pairs.

    Two tests, applied to leading points only and capped at `max_frac` of the curve:
    1. before the early extremum: a monotone law cannot follow a ratio that still moves the wrong way;
    2. deleted-residual test: a leading point is dropped when removing it cuts the SSE of the law by more
       than `threshold`^2 times the residual variance of the fit without it (a `threshold`-sigma outlier
       after the law has adapted to it), which is what warm-up instability looks like.
    """
    f = get_form(form)
    n = D.size
    cap = min(int(n * max_frac), n - (f.k + 3))
    if cap <= 0:
        return []
    out: list[tuple[int, str]] = []
    sd = _noise_sd(A)
    half = A[: max(2, n // 2)]
    sign = -1 if form == "relu" else (1 if form == "silu" else _direction(D, A)[0])
    i_ext = int(np.argmax(half) if sign < 0 else np.argmin(half))
    if 0 < i_ext <= cap and abs(half[i_ext] - half[0]) > 3 * sd:
        word = "rising" if sign < 0 else "falling"
        for i in range(i_ext):
            out.append((i, f"warm-up: the ratio is still {word} before its early extremum at checkpoint "
                           f"{i_ext} (D={D[i_ext]:.3g}B); the {form} law is monotone"))
    start = len(out)
    while start < cap:
        full = fit_form(form, D[start:], A[start:])
        rest = fit_form(form, D[start + 1 :], A[start + 1 :])
        if not (full.success and rest.success):
            break
        dof = max(rest.n - rest.k, 1)
        var = max(rest.sse / dof, (0.25 * sd) ** 2, 1e-14)
        z = math.sqrt(max(full.sse - rest.sse, 0.0) / var)
        if z <= threshold:
            break
        cut = 100 * (1 - rest.sse / full.sse) if full.sse > 0 else 0.0
        out.append((start, f"warm-up instability: {z:.1f} sigma off the {form} law fitted to the later "
                           f"points (leaving it out cuts the SSE by {cut:.0f}%)"))
        start += 1
    return out


# ----------------------------------------------------------------------------------------------------------
# A fitted series: chosen law, all forms side by side, drops, intervals, forecasts
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TargetForecast:
    """Tokens needed to reach `target_ratio` (point estimate and bootstrap interval; inf = never)."""

    target_ratio: float
    tokens: float | None
    interval: list[float | None]
    reachable_fraction: float
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"target_ratio": self.target_ratio, "tokens": self.tokens, "interval": self.interval,
                "reachable_fraction": self.reachable_fraction, "message": self.message}


@dataclass
class LawFit:
    """A series fitted with its chosen law (`fit`) and every other form (`forms`), in scipy's result style.

    Fields: `series`; `form` chosen and `selection` (why); `success`/`message` of the chosen form;
    `fit` (FormFit); `forms` (all four forms by name); `best_by_aic` (lowest AIC among those that fitted);
    `dropped` (list of Dropped); `used` (mask of the points fitted); `forecast` (dict: limit ratio and
    sparsity with intervals, A at given tokens, tokens to target, derivative versus tokens per parameter);
    `band` (grid of D with the curve, confidence and prediction band); `warnings`.
    """

    series: Series
    form: str
    selection: str
    fit: FormFit
    forms: dict[str, FormFit]
    dropped: list[Dropped]
    used: np.ndarray
    best_by_aic: str | None
    forecast: dict[str, Any] = field(default_factory=dict)
    band: dict[str, list[float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return self.fit.success

    @property
    def message(self) -> str:
        return self.fit.message

    @property
    def params(self) -> dict[str, float]:
        return self.fit.params

    def predict(self, tokens: Any, *, level: float | None = None,
                prediction: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ratio at raw `tokens`, with a bootstrap prediction (or confidence) interval: (A, lo, hi)."""
        D = np.atleast_1d(np.asarray(tokens, dtype=float)) / TOKENS_PER_BILLION
        if np.any(D <= 0):
            raise UserError("tokens to predict at must be positive raw token counts")
        lv = self.fit.level if level is None else level
        lo, hi = _interval(REGISTRY[self.form], self.fit, D, lv, noise=prediction)
        return self.fit.predict(D), lo, hi

    def tokens_to(self, target_ratio: float, *, level: float | None = None) -> TargetForecast:
        """Raw tokens at which the fitted curve reaches `target_ratio`, with a bootstrap interval."""
        if not 0 < target_ratio < 1:
            raise UserError(f"target ratio {target_ratio:g} is outside (0, 1); give a fraction like 0.07")
        if not self.fit.success:
            return TargetForecast(target_ratio, None, [None, None], 0.0, f"no fit: {self.fit.message}")
        f = REGISTRY[self.form]
        lv = self.fit.level if level is None else level
        d0 = float(f.invert(self.fit.theta, target_ratio))
        pt = d0 * TOKENS_PER_BILLION if math.isfinite(d0) else None
        interval: list[float | None] = [None, None]
        frac = 1.0 if pt is not None else 0.0
        if self.fit.boot_theta is not None and self.fit.boot_theta.shape[0] > 1:
            ds = f.invert(self.fit.boot_theta, target_ratio) * TOKENS_PER_BILLION
            frac = float(np.isfinite(ds).mean())
            ds = np.where(np.isfinite(ds), ds, 1e300)  # "never" sorts last, so the interval opens above
            q = np.percentile(ds, [(1 - lv) / 2 * 100, (1 + lv) / 2 * 100], method="lower")
            interval = [float(v) if v < 1e299 else None for v in q]
        lim = self.fit.params.get("A0")
        if pt is None:
            msg = (f"never reached: the fitted limit A0 = {lim:.4f} lies on the near side of the target"
                   if lim is not None else "never reached by the fitted curve")
        elif pt < self.series.tokens[0]:
            msg = (f"crossed before the first checkpoint (the curve extrapolated back reaches it at "
                   f"{pt / TOKENS_PER_BILLION:.3g}B tokens)")
        elif pt <= self.series.tokens[-1]:
            msg = f"already reached within the data (at {pt / TOKENS_PER_BILLION:.3g}B tokens)"
        else:
            msg = f"reached after {pt / TOKENS_PER_BILLION:.3g}B tokens"
        if interval[1] is None and pt is not None:
            msg += f"; {100 * (1 - frac):.0f}% of resamples never reach it (interval open above)"
        return TargetForecast(target_ratio, pt, interval, frac, msg)

    def to_json(self) -> dict[str, Any]:
        fj = self.fit.to_json()
        return {
            "name": self.series.name, "form": self.form, "selection": self.selection,
            "success": self.fit.success, "message": self.fit.message, "formula": fj["formula"],
            "params": fj["params"], "n": fj["n"], "k": fj["k"], "sse": fj["sse"], "mse": fj["mse"],
            "mae": fj["mae"], "aic": fj["aic"], "bic": fj["bic"], "ci": fj["ci"], "level": fj["level"],
            "n_boot": fj["n_boot"], "dropped": [d.to_json() for d in self.dropped],
            "baselines": {k: v.to_json() for k, v in self.forms.items() if k != self.form},
            "best_by_aic": self.best_by_aic, "forecast": self.forecast, "band": self.band,
            "warnings": self.warnings, "series": self.series.to_json(), "used": self.used.tolist(),
        }


def _select(D: np.ndarray, A: np.ndarray, activation: str | None) -> tuple[str, str, list[str]]:
    d, why = _direction(D, A, activation)
    form = "relu" if d < 0 else "silu"
    warns = []
    if activation and activation in LAW_FORMS and activation != form:
        warns.append(f"metadata says activation={activation} but {why}; fitted the {form} law "
                     f"(pass --form {activation} to force it)")
    return form, f"auto: {why}, so the {form} law", warns


def fit_series(series: Series | str | os.PathLike, form: str = "auto", *, drop_first: int = 0,
               min_tokens: float | None = None, max_tokens: float | None = None, auto_drop: bool = False,
               bootstrap: int = 1000,
               level: float = 0.95, target_ratio: float | None = None,
               forecast_tokens: Sequence[float] | None = None, seed: int = 0, weighted: bool = False) -> LawFit:
    """Fit a curve: drop early points as asked (recorded), fit every form, pick the law, add intervals.

    `weighted`: weight each point by 1 / its sigma (a tracked series' `activation_ratio_sigma`: the noise
    of its PPL ratio carried to the activation ratio), in the fits and their bootstrap.

    `form` is auto (law chosen by the direction of the data), relu, silu, log or sigmoid. `max_tokens`
    fits the law to one phase of a non-monotone curve (points after it are dropped, with that reason). The chosen form
    gets `bootstrap` resamples; the others get a quarter as many (enough for their intervals). A form that
    fails is reported with `success=False` and its reason.
    """
    s = series if isinstance(series, Series) else load_series(series)
    _check_fit_args(form, drop_first, bootstrap, level)
    D, A, n = s.D, s.activation_ratio, s.tokens.size
    if weighted and s.sigma is None:
        raise UserError(f"{s.name}: --weighted needs activation_ratio_sigma for every point (a series.json "
                        "written by `sparsinglaw track`); fit without --weighted")
    used = np.ones(n, dtype=bool)
    dropped: list[Dropped] = []

    def drop(i: int, reason: str) -> None:
        used[i] = False
        dropped.append(Dropped(i, float(s.tokens[i]), float(A[i]), reason))

    for i in range(min(drop_first, n)):
        drop(i, f"--drop-first {drop_first}")
    if min_tokens is not None:
        for i in np.flatnonzero(used & (s.tokens < min_tokens)):
            drop(int(i), f"--min-tokens {min_tokens:g}: only {s.tokens[i]:g} tokens")
    if max_tokens is not None:
        for i in np.flatnonzero(used & (s.tokens > max_tokens)):
            drop(int(i), f"beyond the fitted range: {s.tokens[i]:g} tokens > {max_tokens:g}")
    if used.sum() < 3:
        raise UserError(f"{s.name}: only {int(used.sum())} points left after dropping {len(dropped)}; "
                        "lower --drop-first or --min-tokens")
    warnings: list[str] = []
    if s.tokens.max() < 1e5:
        warnings.append(f"tokens look small (max {s.tokens.max():g}); they must be raw token counts, "
                        "not billions")
    if form == "auto":
        chosen, selection, w = _select(D[used], A[used], s.activation)
        warnings += w
    else:
        chosen, selection = form, f"given: --form {form}"
    if auto_drop:
        idx = np.flatnonzero(used)
        for pos, reason in auto_drop_early(D[idx], A[idx], chosen):
            drop(int(idx[pos]), "auto: " + reason)
        dropped.sort(key=lambda d: d.index)
    Du, Au = D[used], A[used]
    forms: dict[str, FormFit] = {}
    for name in FORMS:
        nb = bootstrap if name == chosen else bootstrap // 4
        forms[name] = fit_form(name, Du, Au, bootstrap=nb, level=level, seed=seed,
                               sigma=s.sigma[used] if weighted else None)
    fit = forms[chosen]
    ok = {k: v for k, v in forms.items() if v.success}
    best = min(ok, key=lambda k: ok[k].aic) if ok else None
    warnings += _fit_warnings(forms, chosen, best)
    out = LawFit(series=s, form=chosen, selection=selection, fit=fit, forms=forms, dropped=dropped,
                 used=used, best_by_aic=best, warnings=warnings)
    if fit.success:
        _add_forecasts(out, target_ratio, forecast_tokens)
    return out


def _check_fit_args(form: str, drop_first: int, bootstrap: int, level: float) -> None:
    if form != "auto":
        get_form(form)
    if drop_first < 0:
        raise UserError(f"--drop-first must be >= 0, got {drop_first}")
    if bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0, got {bootstrap}")
    if not 0 < level < 1:
        raise UserError(f"level must be in (0, 1), got {level}")


def _fit_warnings(forms: dict[str, FormFit], chosen: str, best: str | None) -> list[str]:
    """What a reader of the chosen fit should know: a form that fits better or as well by AIC, failed
    forms, a fit that did not converge, a parameter at its bound."""
    fit, warnings = forms[chosen], []
    if best is not None and best != chosen and fit.success:
        ok = {k: v for k, v in forms.items() if v.success}
        gap = fit.aic - ok[best].aic
        kind = "baseline" if best in BASELINE_FORMS else "law"
        if gap > 4:
            warnings.append(f"the {best} {kind} fits better than the {chosen} law (AIC lower by {gap:.1f}); "
                            f"the data may not follow the {chosen} law")
        else:
            why = ""
            if chosen == "relu" and best == "sigmoid" and abs(fit.params["alpha"] - 1) < 0.25:
                why = ("; with alpha near 1 the ReLU law and the sigmoid's tail a - 1 + b*exp(c*D) are "
                       "nearly the same curve, so AIC cannot tell them apart")
            warnings.append(f"the {best} {kind} fits about as well as the {chosen} law (AIC lower by "
                            f"{gap:.1f}, within the penalty for one parameter more){why}")
    for name, ff in forms.items():
        if not ff.success:
            warnings.append(f"the {name} form failed: {ff.message}")
    if fit.success and not fit.converged:
        warnings.append(f"the {chosen} fit stopped before converging: {fit.message}")
    if fit.success and chosen == "relu" and fit.params["alpha"] < 2e-3:
        warnings.append("alpha is at its lower bound: the curve is a pure power law A0 + K*D^-(c*alpha), "
                        "so b and c are not separately determined (A0 still is)")
    return warnings


def _add_forecasts(out: LawFit, target_ratio: float | None, forecast_tokens: Sequence[float] | None) -> None:
    s, fit, f = out.series, out.fit, REGISTRY[out.form]
    lv = fit.level
    fc: dict[str, Any] = {}
    if "A0" in fit.params and out.form in LAW_FORMS:
        a0 = fit.params["A0"]
        ci = fit.ci.get("A0")
        fc["limit_ratio"] = a0
        fc["limit_ratio_ci"] = ci
        fc["limit_sparsity"] = 1 - a0
        fc["limit_sparsity_ci"] = [1 - ci[1], 1 - ci[0]] if ci else None
    elif out.form == "sigmoid":
        c = fit.params["c"]
        lim = fit.params["a"] - (0.0 if c > 0 else 1.0)
        fc["limit_ratio"], fc["limit_sparsity"] = lim, 1 - lim
    else:
        fc["limit_ratio"] = None
        fc["note"] = "the logarithmic form has no finite limit"
    last = float(s.tokens[-1])
    toks = list(forecast_tokens) if forecast_tokens else [last, 2 * last, 4 * last, 10 * last]
    a, lo, hi = out.predict(toks)
    fc["at"] = [{"tokens": t, "activation_ratio": float(v), "interval": [float(x), float(y)]}
                for t, v, x, y in zip(toks, a, lo, hi, strict=True)]
    if target_ratio is not None:
        fc["target"] = out.tokens_to(target_ratio).to_json()
    lim = fc.get("limit_ratio")
    if lim is not None:  # the paper's convergence view: tokens until the curve is within 1% of its limit
        conv = out.tokens_to(lim * (1.01 if out.fit.predict(s.D[-1:])[0] > lim else 0.99)).to_json()
        conv["meaning"] = "tokens until the ratio is within 1% (relative) of its limit"
        fc["converged"] = conv
    N = s.non_embedding_params
    if N:
        tpp = s.tokens / N
        dadd = f.deriv(fit.theta, s.D)
        fc["derivative"] = {"non_embedding_params": N, "tokens_per_param": tpp.tolist(),
                            "dA_d_tokens_per_param": (dadd * N / TOKENS_PER_BILLION).tolist(),
                            "meaning": "slope of the activation ratio per token per parameter "
                                       "(smaller magnitude = closer to convergence)"}
    else:
        fc["derivative"] = None
        fc["derivative_note"] = ("give non_embedding_params in the series metadata for the "
                                 "tokens-per-parameter view")
    out.forecast = fc
    grid = np.geomspace(float(s.D.min()), float(s.D.max()) * 2, 120)
    clo, chi = _interval(f, fit, grid, lv, noise=False)
    plo, phi = _interval(f, fit, grid, lv, noise=True)
    out.band = {"D": grid.tolist(), "curve": fit.predict(grid).tolist(), "conf_lo": clo.tolist(),
                "conf_hi": chi.tolist(), "pred_lo": plo.tolist(), "pred_hi": phi.tolist(), "level": lv}


def linearised(fit: LawFit) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Points and line of the linearised plot: ReLU ln(b - ln(A - A0)) vs ln D; SiLU ln(A0 - A) vs ln D.

    Returns (x, y, x_line, y_line) over the usable points (others are undefined), or None for baselines.
    """
    if not fit.success or fit.form not in LAW_FORMS:
        return None
    p, D, A = fit.params, fit.series.D[fit.used], fit.series.activation_ratio[fit.used]
    with np.errstate(all="ignore"):
        if fit.form == "relu":
            y = np.log(p["b"] - np.log(A - p["A0"]))
            line = lambda x: math.log(p["c"]) + p["alpha"] * x  # noqa: E731
        else:
            y = np.log(p["A0"] - A)
            line = lambda x: math.log(p["c"]) - p["alpha"] * x  # noqa: E731
    x = np.log(D)
    ok = np.isfinite(y)
    xl = np.linspace(float(x.min()), float(x.max()), 50)
    return x[ok], y[ok], xl, line(xl)


def scale_table(fits: Sequence[LawFit]) -> list[dict[str, Any]]:
    """A0 versus non-embedding parameters for runs of several sizes, sorted by size (the paper finds that A0
    depends only weakly on size)."""
    rows = []
    for ft in fits:
        ci = ft.fit.ci.get("A0") if ft.success else None
        a0 = ft.fit.params.get("A0") if ft.success and ft.form in LAW_FORMS else None
        rows.append({"name": ft.series.name, "activation": ft.series.activation, "form": ft.form,
                     "non_embedding_params": ft.series.non_embedding_params, "A0": a0, "A0_ci": ci,
                     "limit_sparsity": None if a0 is None else 1 - a0,
                     "tokens_to_within_1pct": (ft.forecast.get("converged") or {}).get("tokens")})
    return sorted(rows, key=lambda r: (r["non_embedding_params"] is None, r["non_embedding_params"] or 0))


# ----------------------------------------------------------------------------------------------------------
# Width-depth law: limit ratio vs d_h/L, linear then flat
# ----------------------------------------------------------------------------------------------------------


@dataclass
class WidthDepthFit:
    """Linear-then-flat law A0(r) = plateau + slope * min(r - breakpoint, 0), r = d_h / L.

    Fields: `success`, `message`; `params` (slope, plateau, breakpoint); `ci` (bootstrap intervals);
    `sse`, `mse`, `mae`, `aic`, `bic`; `compare` (AIC/BIC of a straight line and of a constant, to show
    whether a breakpoint is supported); `ratio`, `limit_ratio`, `names` (the data); `band`.
    """

    success: bool
    message: str
    params: dict[str, float] = field(default_factory=dict)
    ci: dict[str, list[float]] = field(default_factory=dict)
    level: float = 0.95
    n_boot: int = 0
    sse: float = math.nan
    mse: float = math.nan
    mae: float = math.nan
    aic: float = math.nan
    bic: float = math.nan
    compare: dict[str, dict[str, float]] = field(default_factory=dict)
    ratio: list[float] = field(default_factory=list)
    limit_ratio: list[float] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    band: dict[str, list[float]] = field(default_factory=dict)

    def predict(self, ratio: Any) -> np.ndarray:
        p = self.params
        return p["plateau"] + p["slope"] * np.minimum(np.asarray(ratio, dtype=float) - p["breakpoint"], 0)

    def to_json(self) -> dict[str, Any]:
        return {"law": "width-depth", "formula": "A0 = plateau + slope*min(r - breakpoint, 0), r = d_h/L",
                "success": self.success, "message": self.message, "params": self.params, "ci": self.ci,
                "level": self.level, "n_boot": self.n_boot, "sse": _num(self.sse), "mse": _num(self.mse),
                "mae": _num(self.mae), "aic": _num(self.aic), "bic": _num(self.bic), "compare": self.compare,
                "ratio": self.ratio, "limit_ratio": self.limit_ratio, "names": self.names, "band": self.band}


def _hinge_profile(r: np.ndarray, Y: np.ndarray,
                   grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every breakpoint in `grid` and every row of Y, the closed-form (plateau, slope) and SSE.

    Y: (B, n); returns arrays of shape (B, G). For fixed breakpoint the law is linear in its two
    parameters, so the whole profile is a handful of (B, G) array operations.
    """
    x = np.minimum(r[None, :] - grid[:, None], 0.0)  # (G, n)
    n = r.size
    sx, sxx = x.sum(1), (x * x).sum(1)  # (G,)
    sy = Y.sum(1, keepdims=True)  # (B, 1)
    sxy = Y @ x.T  # (B, G)
    syy = (Y * Y).sum(1, keepdims=True)
    det = n * sxx - sx * sx
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(det > 0, (n * sxy - sx * sy) / det, 0.0)
        plateau = (sy - slope * sx) / n
    sse = (syy - 2 * plateau * sy - 2 * slope * sxy + n * plateau**2 + 2 * plateau * slope * sx
           + slope**2 * sxx)
    return plateau, slope, np.maximum(sse, 0.0)


def fit_width_depth(ratio: Any, limit_ratio: Any, *, names: Sequence[str] | None = None,
                    bootstrap: int = 1000,
                    level: float = 0.95, seed: int = 0) -> WidthDepthFit:
    """Fit the linear-then-flat law to limit ratios at several width-depth ratios, with bootstrap CIs."""
    r = np.asarray(ratio, dtype=float).reshape(-1)
    a = np.asarray(limit_ratio, dtype=float).reshape(-1)
    if r.size != a.size:
        raise UserError(f"width-depth: {r.size} ratios but {a.size} limit ratios; give one per model")
    if r.size < 4:
        raise UserError(f"width-depth: {r.size} points is too few for slope, plateau and breakpoint; "
                        "give limit ratios for at least 4 width-depth ratios")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(a))):
        raise UserError("width-depth: ratios and limit ratios must be finite numbers (found NaN or inf)")
    if np.any(r <= 0):
        raise UserError("width-depth: width-depth ratios d_h/L must be positive")
    if np.any((a <= 0) | (a >= 1)):
        raise UserError("width-depth: limit ratios must be fractions in (0, 1) (0.08 for 8%)")
    if np.unique(r).size < 3:
        raise UserError("width-depth: need at least 3 distinct width-depth ratios")
    order = np.argsort(r)
    r, a = r[order], a[order]
    nm = [str(x) for x in np.asarray(list(names) if names else [""] * r.size, dtype=object)[order]]
    n = r.size
    us = np.unique(r)
    grid = np.geomspace(us[1], us[-1], 1500)  # at least two distinct ratios at or below the breakpoint
    pl, sl, sse = _hinge_profile(r, a[None, :], grid)
    j = int(np.argmin(sse[0]))
    # refine inside the best grid cell (the profile is smooth between data ratios)
    lo_b, hi_b = grid[max(j - 1, 0)], grid[min(j + 1, grid.size - 1)]
    fine = np.linspace(lo_b, hi_b, 401)
    plf, slf, ssef = _hinge_profile(r, a[None, :], fine)
    jf = int(np.argmin(ssef[0]))
    bp, plateau, slope, s_best = float(fine[jf]), float(plf[0, jf]), float(slf[0, jf]), float(ssef[0, jf])
    fitted = plateau + slope * np.minimum(r - bp, 0)
    out = WidthDepthFit(success=True, message="fitted by profile over the breakpoint", level=level,
                        params={"slope": slope, "plateau": plateau, "breakpoint": bp},
                        **_criteria(s_best, float(np.abs(a - fitted).sum()), n, 3),
                        ratio=r.tolist(), limit_ratio=a.tolist(), names=nm)
    _, lin_q, lin_sse = _linfit(r, a)
    lin_abs = float(np.abs(a - a.mean() - lin_q * (r - r.mean())).sum())
    out.compare = {"line": _criteria(lin_sse, lin_abs, n, 2),
                   "constant": _criteria(float(((a - a.mean()) ** 2).sum()),
                                         float(np.abs(a - a.mean()).sum()), n, 1)}
    if slope <= 0:
        out.message += "; the slope is not positive (the paper finds the ratio rising below the breakpoint)"
    if j in (0, grid.size - 1):
        out.message += "; the breakpoint sits at the edge of the data, so it is not pinned down"
    g = np.geomspace(float(r.min()), float(r.max()), 200)
    out.band = {"ratio": g.tolist(), "curve": out.predict(g).tolist()}
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        res = (a - fitted - (a - fitted).mean()) * math.sqrt(n / max(n - 3, 1))
        q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
        P, S, BP = [], [], []
        for chunk in np.array_split(np.arange(bootstrap), max(1, bootstrap // 250)):
            Y = fitted[None, :] + res[rng.integers(0, n, size=(chunk.size, n))]
            p_, s_, e_ = _hinge_profile(r, Y, grid)
            jj = np.argmin(e_, axis=1)
            rows = np.arange(chunk.size)
            P.append(p_[rows, jj])
            S.append(s_[rows, jj])
            BP.append(grid[jj])
        P, S, BP = np.concatenate(P), np.concatenate(S), np.concatenate(BP)
        out.ci = {"slope": np.percentile(S, q).tolist(), "plateau": np.percentile(P, q).tolist(),
                  "breakpoint": np.percentile(BP, q).tolist()}
        out.n_boot = bootstrap
        curves = P[:, None] + S[:, None] * np.minimum(g[None, :] - BP[:, None], 0)
        lo, hi = np.percentile(curves, q, axis=0)
        out.band.update({"conf_lo": lo.tolist(), "conf_hi": hi.tolist()})
    return out


def load_width_depth(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read (d_h/L ratios, limit ratios, names) from JSON or CSV.

    JSON: {"points": [{"width": 768, "depth": 16, "limit_ratio": 0.061, "name": "..."}, ...]} or parallel
    lists ("ratio" or "width"+"depth", and "limit_ratio" or "A0"). CSV: the same column names.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; give a width-depth .json or .csv")
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            rows = [{k.strip().lower(): v for k, v in row.items()} for row in csv.DictReader(f)]
    else:
        try:
            obj = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(obj, dict) and isinstance(obj.get("points"), list):
            rows = obj["points"]
        elif isinstance(obj, list):
            rows = obj
        elif isinstance(obj, dict):
            keys = [k for k in ("ratio", "width", "depth", "limit_ratio", "A0", "name") if k in obj]
            m = len(obj[keys[0]]) if keys else 0
            rows = [{k: obj[k][i] for k in keys} for i in range(m)]
        else:
            rows = []
    rat, lim, names = [], [], []
    try:
        for i, row in enumerate(rows):
            if row.get("ratio") not in (None, ""):
                rat.append(float(row["ratio"]))
            elif row.get("width") not in (None, "") and row.get("depth") not in (None, ""):
                rat.append(float(row["width"]) / float(row["depth"]))
            else:
                raise UserError(f"{path}: point {i} has neither 'ratio' nor 'width' and 'depth'")
            v = row.get("limit_ratio", row.get("A0", row.get("a0")))
            if v in (None, ""):
                raise UserError(f"{path}: point {i} has no 'limit_ratio' (or 'A0')")
            lim.append(float(v))
            names.append(str(row.get("name") or f"{row.get('width', '')}/{row.get('depth', '')}".strip("/")
                             or f"r={rat[-1]:g}"))
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise UserError(f"{path}: a ratio, width, depth or limit ratio is not a usable number "
                        f"({e})") from None
    if not rat:
        raise UserError(f"{path}: no width-depth points found; expected 'points' with width, depth and "
                        "limit_ratio (or parallel lists)")
    return np.array(rat), np.array(lim), names


# ----------------------------------------------------------------------------------------------------------
# Human-readable summaries (the CLI prints these)
# ----------------------------------------------------------------------------------------------------------


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def summary_row(ft: LawFit) -> dict[str, str]:
    """One line of the fit table: the chosen law, A0 with its interval, and the AIC margin to the rest."""
    f, p = ft.fit, ft.fit.params
    a0, ci = p.get("A0"), f.ci.get("A0")
    others = [v.aic for k, v in ft.forms.items() if k != ft.form and v.success]
    margin = (min(others) - f.aic) if others and f.success else None
    return {"series": ft.series.name, "form": ft.form + ("" if f.success else " (failed)"),
            "points": f"{int(ft.used.sum())}/{ft.used.size}",
            "A0": _fmt(a0, ".4f") if ft.form in LAW_FORMS else "-",
            "A0 CI": f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci and ft.form in LAW_FORMS else "-",
            "alpha": _fmt(p.get("alpha"), ".3g"), "c": _fmt(p.get("c"), ".3g"), "b": _fmt(p.get("b"), ".3g"),
            "MSE": _fmt(f.mse, ".2e"), "AIC": _fmt(f.aic, ".1f"),
            "dAIC next": _fmt(margin, "+.1f"), "best": ft.best_by_aic or "-", "dropped": str(len(ft.dropped))}


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain fixed-width table (first row's keys are the header)."""
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    w = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w[i]) for i, v in enumerate(vals)).rstrip()  # noqa: E731
    return "\n".join([line(cols), line(["-" * x for x in w])] + [line(r) for r in cells])


def width_depth_row(wd: WidthDepthFit) -> dict[str, str]:
    p, ci = wd.params, wd.ci
    iv = lambda k, s: f"[{ci[k][0]:{s}}, {ci[k][1]:{s}}]" if k in ci else "-"  # noqa: E731
    return {"points": str(len(wd.ratio)), "slope": f"{p['slope']:.3g}", "slope CI": iv("slope", ".3g"),
            "plateau": f"{p['plateau']:.4f}", "plateau CI": iv("plateau", ".4f"),
            "breakpoint": f"{p['breakpoint']:.1f}", "breakpoint CI": iv("breakpoint", ".1f"),
            "AIC": f"{wd.aic:.1f}", "AIC line": f"{wd.compare['line']['aic']:.1f}",
            "AIC const": f"{wd.compare['constant']['aic']:.1f}"}


def summary_text(fits: Sequence[LawFit], wd: WidthDepthFit | None = None) -> str:
    """What the CLI prints: the fit table, every dropped point with its reason, targets, warnings, scale."""
    lines: list[str] = []
    if fits:
        lines.append(format_table([summary_row(ft) for ft in fits]))
        for ft in fits:
            nm = ft.series.name
            lines += [f"  {nm}: dropped checkpoint {d.index} ({d.tokens:.3g} tokens): {d.reason}"
                      for d in ft.dropped]
            tg = ft.forecast.get("target")
            if tg:
                iv = ", ".join("-" if v is None else f"{v:.3g}" for v in tg["interval"])
                lines.append(f"  {nm}: target {tg['target_ratio']:g}: {tg['message']} "
                             f"(interval [{iv}] tokens)")
            lines += [f"  {nm}: warning: {w}" for w in ft.warnings]
        table = scale_table(fits)
        if len(fits) > 1 and any(r["non_embedding_params"] for r in table):
            lines += ["", "A0 vs non-embedding parameters:", format_table([
                {"series": r["name"], "params": _fmt(r["non_embedding_params"], ".4g"),
                 "A0": _fmt(r["A0"], ".4f"),
                 "A0 CI": "-" if not r["A0_ci"] else f"[{r['A0_ci'][0]:.4f}, {r['A0_ci'][1]:.4f}]",
                 "limit sparsity": _fmt(r["limit_sparsity"], ".2%"),
                 "tokens to 1% of limit": _fmt(r["tokens_to_within_1pct"], ".3g")} for r in table])]
    if wd is not None:
        lines += ["", "width-depth law: A0 = plateau + slope*min(d_h/L - breakpoint, 0)",
                  format_table([width_depth_row(wd)]), f"  {wd.message}"]
    return "\n".join(lines)


def save_fits(fits: Sequence[LawFit], folder: str | os.PathLike) -> list[Path]:
    """Write fit.json and plots per series (in `folder` for one, `folder/<name>/` for several), plus the
    multi-run chart, summary.json and the scale table. Call inside `io.staged_dir` so nothing is half-written.
    """
    from sparsinglaw import plots
    from sparsinglaw.io import atomic_write_json

    folder = Path(folder)
    written: list[Path] = []
    for ft in fits:
        sub = folder if len(fits) == 1 else folder / ft.series.name
        atomic_write_json(sub / "fit.json", ft.to_json())
        written.append(sub / "fit.json")
        if not ft.success:
            continue
        s = ft.series
        others = []
        best = ft.forms.get(ft.best_by_aic) if ft.best_by_aic and ft.best_by_aic != ft.form else None
        if best is not None and best.success and ft.band.get("D"):  # a form that fits better: drawn beside
            kind = "baseline" if ft.best_by_aic in BASELINE_FORMS else "law"
            others.append({"label": f"{ft.best_by_aic} {kind} (lower AIC)", "D": ft.band["D"],
                           "curve": best.predict(np.asarray(ft.band["D"]))})
        written.append(plots.plot_law_fit(s.D, s.activation_ratio, ft.used, ft.band, sub / "fit.png",
                                          title=f"{s.name}: {ft.fit.formula}", label=ft.form,
                                          others=others))
        lin = linearised(ft)
        if lin is not None and lin[0].size:
            written.append(plots.plot_linearised(*lin, ft.form, sub / "linearised.png",
                                                 title=f"{s.name}: linearised {ft.form} law"))
    if len(fits) > 1:
        atomic_write_json(folder / "summary.json", {"fits": [summary_row(ft) for ft in fits],
                                                    "scale": scale_table(fits)})
        written.append(folder / "summary.json")
        runs = [{"name": ft.series.name, "x": ft.series.D, "A": ft.series.activation_ratio, "used": ft.used,
                 "x_curve": np.asarray(ft.band["D"]) if ft.band else None, "curve": ft.band.get("curve"),
                 "lo": ft.band.get("conf_lo"), "hi": ft.band.get("conf_hi"),
                 "A0": ft.params.get("A0") if ft.success and ft.form in LAW_FORMS else None} for ft in fits]
        written.append(plots.plot_law_runs(runs, folder / "runs.png",
                                           title="activation ratio vs training data"))
        if all(ft.series.non_embedding_params for ft in fits):  # the paper's convergence-speed view
            for r, ft in zip(runs, fits, strict=True):
                k = ft.series.non_embedding_params / TOKENS_PER_BILLION
                r["x"] = r["x"] / k
                r["x_curve"] = None if r["x_curve"] is None else r["x_curve"] / k
            written.append(plots.plot_law_runs(runs, folder / "runs_tokens_per_param.png",
                                               xlabel="tokens per non-embedding parameter",
                                               title="activation ratio vs tokens per parameter"))
    return written


def save_width_depth(wd: WidthDepthFit, folder: str | os.PathLike) -> list[Path]:
    """Write widthdepth.json and widthdepth.png."""
    from sparsinglaw import plots
    from sparsinglaw.io import atomic_write_json

    folder = Path(folder)
    atomic_write_json(folder / "widthdepth.json", wd.to_json())
    png = plots.plot_width_depth(wd.ratio, wd.limit_ratio, wd.band, wd.params["breakpoint"],
                                 folder / "widthdepth.png", breakpoint_ci=wd.ci.get("breakpoint"),
                                 names=wd.names, title="limit activation ratio vs width-depth ratio")
    return [folder / "widthdepth.json", png]


def is_series_file(path: str | os.PathLike) -> bool:
    """True when a file looks like an activation-ratio series (has tokens), not a width-depth table."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="") as f:
                head = f.readline().lower()
            return "tokens" in head
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return True  # let the series loader report the problem in one line
    return isinstance(obj, dict) and "tokens" in obj


def width_depth_from_fits(fits: Sequence[LawFit], *, bootstrap: int = 1000, level: float = 0.95,
                          seed: int = 0) -> WidthDepthFit:
    """Limit ratios of fitted runs (width and depth in their metadata) -> the width-depth law."""
    ok = [ft for ft in fits if ft.success and ft.form in LAW_FORMS]
    miss = [ft.series.name for ft in ok if not (ft.series.width and ft.series.depth)]
    if miss:
        raise UserError("--law width-depth needs width and depth in each series' metadata (missing in "
                        f"{', '.join(miss)}), or give one width-depth file")
    return fit_width_depth([ft.series.width / ft.series.depth for ft in ok], [ft.params["A0"] for ft in ok],
                           names=[ft.series.name for ft in ok], bootstrap=bootstrap, level=level, seed=seed)


def unique_names(series: Sequence[Series]) -> None:
    """Give every series a distinct, path-safe name (they become output folder names)."""
    seen: set[str] = set()
    for s in series:
        base = "".join(ch if ch.isalnum() or ch in "-_.+" else "_" for ch in s.name) or "series"
        name, i = base, 2
        while name in seen:
            name, i = f"{base}-{i}", i + 1
        s.name = name
        seen.add(name)
