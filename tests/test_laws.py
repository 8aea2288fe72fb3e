"""Laws of activation ratio: recovery of the paper's coefficients, model comparison, bad input, the CLI.

Synthetic curves use the paper's published coefficients, sampled like the paper: 30-40 evenly
spaced checkpoints from about 1B tokens (ReLU) or where A is near 0.31 (SiLU) up to 385 tokens per
non-embedding parameter (800B tokens for 2.4B), with Gaussian noise of 5e-4 and fixed seeds.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from sparsinglaw import laws
from sparsinglaw.cli import main
from sparsinglaw.errors import UserError

warnings.filterwarnings("ignore", category=RuntimeWarning)

# form, alpha, b, c, A0, non-embedding params
PUBLISHED = {
    "relu-0.1B": ("relu", 0.101, -0.0151, 3.20, 0.0614, 108.5e6),
    "relu-0.2B": ("relu", 0.449, -3.05, 0.286, 0.0674, 241.2e6),
    "relu-0.4B": ("relu", 0.683, -3.46, 0.0790, 0.0690, 452.2e6),
    "relu-0.8B": ("relu", 1.01, -3.49, 0.00797, 0.0721, 759.7e6),
    "relu-1.2B": ("relu", 1.33, -3.89, 0.000903, 0.0782, 1181.8e6),
    "relu-2.4B": ("relu", 1.53, -3.46, 0.000156, 0.0648, 2441.9e6),
    "silu-0.1B": ("silu", 0.479, None, 0.102, 0.409, 108.5e6),
    "silu-0.2B": ("silu", 0.844, None, 0.208, 0.390, 241.2e6),
    "silu-0.4B": ("silu", 1.03, None, 0.420, 0.385, 452.2e6),
    "silu-0.8B": ("silu", 0.995, None, 0.562, 0.383, 759.7e6),
    "silu-1.2B": ("silu", 0.967, None, 0.538, 0.382, 1181.8e6),
}
NOISE = 5e-4


def paper_curve(key: str, n: int = 40, seed: int = 0, tpp: float = 385) -> tuple[np.ndarray, np.ndarray]:
    """(raw tokens, noisy ratio) sampled like the paper's checkpoints."""
    form, al, b, c, a0, params = PUBLISHED[key]
    end = 800.0 if key == "relu-2.4B" else tpp * params / 1e9
    start = 1.0 if form == "relu" else max((c / (a0 - 0.31)) ** (1 / al), 1.0)
    D = np.linspace(start, end, n)
    A = np.exp(-c * D**al + b) + a0 if form == "relu" else a0 - c * D ** (-al)
    return D * 1e9, A + np.random.default_rng(seed).normal(0, NOISE, n)


def series(key: str, **kw) -> laws.Series:
    t, a = paper_curve(key, **kw)
    return laws.Series(t, a, name=key, activation=key[:4], non_embedding_params=PUBLISHED[key][5])


# --- recovery and model comparison ------------------------------------------------------------------------

# runs whose sampled range pins A0 down; 0.1B/0.2B (slow convergence) and 0.8B (alpha ~ 1) are tested below
IDENTIFIABLE = ["relu-0.4B", "relu-1.2B", "relu-2.4B", "silu-0.1B", "silu-0.2B", "silu-0.4B", "silu-0.8B",
                "silu-1.2B"]


@pytest.mark.parametrize("key", IDENTIFIABLE)
def test_recovers_published_A0_and_law_beats_baselines_by_aic(key):
    fit = laws.fit_series(series(key), bootstrap=200)
    assert fit.success and fit.form == key[:4]
    assert abs(fit.params["A0"] - PUBLISHED[key][4]) < 0.003
    lo, hi = fit.fit.ci["A0"]
    assert lo <= fit.params["A0"] <= hi
    for name, other in fit.forms.items():
        if name != fit.form and other.success:
            assert fit.fit.aic < other.aic, (name, other.aic, fit.fit.aic)
    assert fit.best_by_aic == fit.form


@pytest.mark.parametrize("key", ["relu-0.1B", "relu-0.2B"])
def test_slowly_converging_runs_have_intervals_that_cover_the_published_A0(key):
    # these curves end well above A0 (the fit extrapolates), so the honest claim is the interval
    fit = laws.fit_series(series(key), bootstrap=300)
    lo, hi = fit.fit.ci["A0"]
    assert lo <= PUBLISHED[key][4] <= hi
    assert fit.best_by_aic == "relu"


def test_alpha_near_one_relu_recovers_A0_and_says_sigmoid_is_equivalent():
    fit = laws.fit_series(series("relu-0.8B"), bootstrap=200)
    assert abs(fit.params["A0"] - 0.0721) < 0.003
    assert abs(fit.params["alpha"] - 1.01) < 0.2
    best = fit.forms[fit.best_by_aic]
    assert fit.fit.aic - best.aic < 2.5  # at most the one-parameter penalty behind
    if fit.best_by_aic != "relu":
        assert any("about as well" in w for w in fit.warnings)


@pytest.mark.parametrize("name,make", [
    ("log", lambda D: 0.02 * np.log(D + 1) + 0.30),
    ("log", lambda D: -0.006 * np.log(D + 0.5) + 0.10),
    ("sigmoid", lambda D: 0.9 - 1 / (1 + np.exp(-1.55 + 0.05 * D))),
    ("sigmoid", lambda D: 1.07 - 1 / (1 + np.exp(np.log(0.06) - 0.03 * D))),
])
def test_curves_made_by_a_baseline_are_recognised(name, make):
    D = np.linspace(1, 100, 30)
    A = make(D) + np.random.default_rng(1).normal(0, NOISE, D.size)
    fit = laws.fit_series(laws.Series(D * 1e9, A), bootstrap=0)
    assert fit.best_by_aic == name
    assert any(f"the {name} baseline" in w for w in fit.warnings)


def test_every_form_reports_sse_mse_mae_aic_bic():
    fit = laws.fit_series(series("silu-0.4B", n=30), bootstrap=50)
    for f in fit.forms.values():
        assert f.success
        assert math.isclose(f.mse, f.sse / f.n)
        assert math.isclose(f.aic, f.n * math.log(f.sse / f.n) + 2 * f.k)
        assert math.isclose(f.bic, f.n * math.log(f.sse / f.n) + f.k * math.log(f.n))
        assert f.mae > 0 and set(f.ci) == set(f.params)


def test_batched_bootstrap_solver_matches_scipy():
    t, A = paper_curve("relu-0.1B", n=40, seed=3)
    D = t / 1e9
    f = laws.REGISTRY["relu"]
    fit = laws.fit_form("relu", D, A)
    rng = np.random.default_rng(0)
    fitted = f.value(fit.theta, D)
    Y = fitted + (A - fitted)[rng.integers(0, D.size, (20, D.size))]
    lo, hi = f.bounds(D, A)
    _, sse = laws._batched_lm(f, np.tile(fit.theta, (20, 1)), D, Y, lo, hi)
    ref = np.array([laws._polish(f, D, Y[i], fit.theta, lo, hi)[1] for i in range(20)])
    assert np.all(sse <= ref * (1 + 1e-4))


# --- early points -----------------------------------------------------------------------------------------


def test_auto_drop_finds_warm_up_points_and_says_why():
    t, A = paper_curve("relu-0.4B", n=36)
    clean = laws.fit_series(laws.Series(t, A), auto_drop=True, bootstrap=0)
    assert clean.dropped == []
    A[:3] = [0.05, 0.07, A[2] + 0.01]  # ratio still rising, then an unstable checkpoint
    fit = laws.fit_series(laws.Series(t, A), auto_drop=True, bootstrap=0)
    assert [d.index for d in fit.dropped] == [0, 1, 2]
    assert all(d.reason.startswith("auto: warm-up") for d in fit.dropped)
    assert abs(fit.params["A0"] - 0.0690) < 0.003
    assert fit.used.sum() == 33


def test_auto_direction_is_not_fooled_by_warm_up_points():
    t, A = paper_curve("silu-1.2B", n=36)
    A[:3] = [0.45, 0.40, A[2] - 0.02]
    fit = laws.fit_series(laws.Series(t, A), auto_drop=True, bootstrap=0)
    assert fit.form == "silu" and [d.index for d in fit.dropped] == [0, 1, 2]


def test_manual_drops_are_recorded():
    t, A = paper_curve("silu-0.4B", n=30)
    fit = laws.fit_series(laws.Series(t, A), drop_first=2, min_tokens=t[4], bootstrap=0)
    assert [d.index for d in fit.dropped] == [0, 1, 2, 3]
    assert "--drop-first" in fit.dropped[0].reason and "--min-tokens" in fit.dropped[2].reason
    assert fit.fit.n == 26


# --- forecasts --------------------------------------------------------------------------------------------


def test_forecasts_target_tokens_limit_and_derivative():
    s = series("relu-1.2B")
    fit = laws.fit_series(s, bootstrap=300, target_ratio=0.080)
    tg = fit.tokens_to(0.080)
    assert tg.tokens is not None and tg.interval[0] <= tg.tokens <= (tg.interval[1] or math.inf)
    a, lo, hi = fit.predict([tg.tokens])
    assert abs(a[0] - 0.080) < 1e-6 and lo[0] <= a[0] <= hi[0]
    assert fit.tokens_to(0.05).tokens is None  # below the limit: never reached
    fc = fit.forecast
    assert math.isclose(fc["limit_sparsity"], 1 - fc["limit_ratio"])
    assert fc["target"]["tokens"] == tg.tokens
    der = fc["derivative"]
    assert len(der["tokens_per_param"]) == s.tokens.size
    assert all(v < 0 for v in der["dA_d_tokens_per_param"])  # ReLU falls
    # the paper's view: at 100 tokens per parameter the smaller run is flatter (closer to its limit)
    small = laws.fit_series(series("relu-0.4B"), bootstrap=0)
    assert abs(_slope_per_tpp(small, 100)) < abs(_slope_per_tpp(fit, 100))


def _slope_per_tpp(fit: laws.LawFit, tpp: float) -> float:
    n = fit.series.non_embedding_params
    return float(laws.REGISTRY[fit.form].deriv(fit.fit.theta, np.array([tpp * n / 1e9]))[0]) * n / 1e9


def test_linearised_view_is_a_straight_line_through_the_data():
    fit = laws.fit_series(series("relu-2.4B"), bootstrap=0)
    x, y, xl, yl = laws.linearised(fit)
    p = fit.params
    assert np.allclose(np.interp(x, xl, yl), math.log(p["c"]) + p["alpha"] * x)
    # noise is amplified where A - A0 is tiny (late points), so judge the typical point
    assert np.median(np.abs(y - (math.log(p["c"]) + p["alpha"] * x))) < 0.1
    assert np.corrcoef(x, y)[0, 1] > 0.95


# --- width-depth and scale --------------------------------------------------------------------------------

FAMILY = [(256, 144), (384, 64), (512, 36), (768, 16), (896, 12), (1024, 9), (1152, 7), (1280, 6), (1408, 5),
          (1536, 4), (1792, 3), (2048, 2)]


def test_width_depth_breakpoint_recovered():
    r = np.array([w / d for w, d in FAMILY])
    a = 0.08 + 0.0002 * np.minimum(r - 114, 0) + np.random.default_rng(0).normal(0, NOISE, r.size)
    wd = laws.fit_width_depth(r, a, bootstrap=1000)
    assert abs(wd.params["breakpoint"] - 114) < 10
    lo, hi = wd.ci["breakpoint"]
    assert lo <= 114 <= hi
    assert abs(wd.params["plateau"] - 0.08) < 0.001 and abs(wd.params["slope"] - 0.0002) < 3e-5
    assert wd.aic < wd.compare["line"]["aic"] and wd.aic < wd.compare["constant"]["aic"]


def test_scale_table_sorted_by_parameters():
    fits = [laws.fit_series(series(k, n=30), bootstrap=0) for k in ("silu-0.8B", "silu-0.1B")]
    rows = laws.scale_table(fits)
    assert [r["name"] for r in rows] == ["silu-0.1B", "silu-0.8B"]
    assert rows[0]["A0"] > rows[1]["A0"]  # SiLU: 40.9% -> 38.3%


# --- bad input --------------------------------------------------------------------------------------------

GOOD_T = [1e9, 2e9, 3e9, 4e9, 5e9, 6e9]
GOOD_A = [0.10, 0.09, 0.085, 0.082, 0.08, 0.079]


@pytest.mark.parametrize("tokens,ratio,words", [
    (GOOD_T[:2], GOOD_A[:2], "too few"),
    (GOOD_T, GOOD_A[:5], "one ratio per checkpoint"),
    ([1e9, float("nan"), 3e9, 4e9, 5e9, 6e9], GOOD_A, "NaN or infinite"),
    (GOOD_T, [0.1, 0.09, float("inf"), 0.08, 0.08, 0.07], "NaN or infinite"),
    ([0, 2e9, 3e9, 4e9, 5e9, 6e9], GOOD_A, "not positive"),
    ([-1e9, 2e9, 3e9, 4e9, 5e9, 6e9], GOOD_A, "not positive"),
    (GOOD_T, [10, 9, 8.5, 8.2, 8, 7.9], "divide percentages by 100"),
    (GOOD_T, [0.1, 0.09, 0.0, 0.08, 0.08, 0.07], "outside (0, 1)"),
    (GOOD_T, [0.1, 0.09, 1.0, 0.08, 0.08, 0.07], "outside (0, 1)"),
    ([1e9, 3e9, 2e9, 4e9, 5e9, 6e9], GOOD_A, "unsorted"),
    ([1e9, 2e9, 2e9, 4e9, 5e9, 6e9], GOOD_A, "duplicated"),
])
def test_bad_series_is_one_clear_user_error(tokens, ratio, words):
    with pytest.raises(UserError) as e:
        laws.Series(tokens, ratio)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_fewer_points_than_parameters_is_a_failed_form_not_a_crash():
    fit = laws.fit_series(laws.Series(GOOD_T[:4], GOOD_A[:4]), form="relu", bootstrap=10)
    assert not fit.success and "needs at least 5 points" in fit.message
    assert fit.forms["silu"].success and fit.forms["log"].success
    assert any("relu form failed" in w for w in fit.warnings)
    assert json.dumps(fit.to_json())


def test_a_form_whose_starts_all_fail_reports_why(monkeypatch):
    monkeypatch.setattr(laws, "_polish", lambda *a, **k: (a[3], math.inf, False, "residuals not finite"))
    f = laws.fit_form("silu", np.arange(1.0, 11), np.linspace(0.3, 0.38, 10))
    assert not f.success and "no start gave a finite fit" in f.message


def test_bad_options_raise_user_error():
    s = laws.Series(GOOD_T, GOOD_A)
    for kw in ({"form": "cubic"}, {"drop_first": -1}, {"drop_first": 5}, {"bootstrap": -3}):
        with pytest.raises(UserError):
            laws.fit_series(s, **kw)
    with pytest.raises(UserError):
        laws.fit_width_depth([1, 2, 3], [0.05, 0.06, 0.07])


def test_loaders(tmp_path):
    t, A = paper_curve("silu-0.4B", n=25)
    run = tmp_path / "runs" / "tiny-silu"
    run.mkdir(parents=True)
    # a tracked run's series.json: same keys plus extras to ignore
    (run / "series.json").write_text(json.dumps({
        "tokens": t.tolist(), "activation_ratio": A.tolist(), "tau": 0.12, "ppl": [1.0] * 25,
        "per_layer": [[0.3, 0.4]] * 25, "activation": "silu", "non_embedding_params": 452.2e6}))
    s = laws.load_series(run / "series.json")
    assert s.name == "tiny-silu" and s.activation == "silu" and s.non_embedding_params == 452.2e6
    csv = tmp_path / "c.csv"
    csv.write_text("tokens,activation_ratio\n" + "\n".join(f"{a},{b}" for a, b in zip(t, A, strict=True)))
    assert np.allclose(laws.load_series(csv).activation_ratio, A)
    (tmp_path / "bad.csv").write_text("step,ratio\n1,0.1\n")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "nokeys.json").write_text(json.dumps({"tokens": [1, 2, 3]}))
    for name in ("bad.csv", "bad.json", "nokeys.json", "missing.json"):
        with pytest.raises(UserError):
            laws.load_series(tmp_path / name)


# --- CLI --------------------------------------------------------------------------------------------------

REQUIRED = {"form", "params", "mse", "mae", "aic", "bic", "ci", "dropped", "baselines", "forecast"}


def _write(path, key, **kw):
    t, A = paper_curve(key, **kw)
    path.write_text(json.dumps({"tokens": t.tolist(), "activation_ratio": A.tolist(), "name": key,
                                "non_embedding_params": PUBLISHED[key][5]}))
    return str(path)


def test_cli_fit_one_series_writes_fit_json_and_plots(tmp_path, capsys):
    p = _write(tmp_path / "s.json", "relu-2.4B", n=30)
    out = tmp_path / "fits"
    main(["fit", p, "--out", str(out), "--bootstrap", "200", "--target-ratio", "0.066", "--auto-drop"])
    fj = json.loads((out / "fit.json").read_text())
    assert REQUIRED <= set(fj)
    assert fj["form"] == "relu" and set(fj["params"]) == {"alpha", "b", "c", "A0"}
    assert set(fj["baselines"]) == {"silu", "log", "sigmoid"}
    assert REQUIRED - {"dropped", "baselines", "forecast"} <= set(fj["baselines"]["log"])
    assert fj["forecast"]["target"]["tokens"] > 0
    assert (out / "fit.png").stat().st_size > 0 and (out / "linearised.png").stat().st_size > 0
    assert "relu-2.4B" in capsys.readouterr().out


def test_cli_fit_several_runs_and_width_depth(tmp_path, capsys):
    paths = [_write(tmp_path / f"{k}.json", k, n=25) for k in ("silu-0.1B", "silu-0.4B")]
    out = tmp_path / "many"
    main(["fit", *paths, "--out", str(out), "--bootstrap", "50"])
    for k in ("silu-0.1B", "silu-0.4B"):
        assert REQUIRED <= set(json.loads((out / k / "fit.json").read_text()))
    assert (out / "runs.png").exists() and (out / "runs_tokens_per_param.png").exists()
    assert "A0 vs non-embedding parameters" in capsys.readouterr().out
    wdj = tmp_path / "wd.json"
    r = [w / d for w, d in FAMILY]
    pts = [{"width": w, "depth": d, "limit_ratio": 0.08 + 0.0002 * min(x - 114, 0)}
           for (w, d), x in zip(FAMILY, r, strict=True)]
    wdj.write_text(json.dumps({"points": pts}))
    main(["fit", str(wdj), "--law", "width-depth", "--out", str(tmp_path / "wd"), "--bootstrap", "200"])
    wd = json.loads((tmp_path / "wd" / "widthdepth.json").read_text())
    assert abs(wd["params"]["breakpoint"] - 114) < 2 and (tmp_path / "wd" / "widthdepth.png").exists()


@pytest.mark.parametrize("args,content", [
    (["--form", "cubic"], None),
    ([], {"tokens": [1e9, 2e9, 2e9, 4e9], "activation_ratio": [0.1, 0.09, 0.08, 0.07]}),
    ([], {"tokens": [1e9, 2e9, 3e9, 4e9], "activation_ratio": [10, 9, 8, 7]}),
    ([], {"tokens": [1e9, 2e9, 3e9, 4e9], "activation_ratio": [0.1, None, 0.08, 0.07]}),
    (["--form", "relu"], {"tokens": [1e9, 2e9, 3e9, 4e9], "activation_ratio": [0.1, 0.09, 0.085, 0.08]}),
    (["--target-ratio", "7"], None),
    (["--law", "depth"], None),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, args, content):
    p = tmp_path / "s.json"
    if content is None:
        _write(p, "silu-0.4B", n=20)
    else:
        p.write_text(json.dumps(content))
    with pytest.raises(SystemExit) as e:
        main(["fit", str(p), "--out", str(tmp_path / "o"), "--bootstrap", "10", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1


def test_weighted_fit_is_scipy_curve_fit_with_sigma():
    """fit_form(sigma=...) against scipy's curve_fit(sigma=..., absolute_sigma=False): same optimum."""
    from scipy.optimize import curve_fit

    tokens, A = paper_curve("silu-0.1B", n=30, seed=2)
    D = tokens / 1e9
    rng = np.random.default_rng(0)
    sigma = rng.uniform(0.0005, 0.004, size=D.size)
    A = A + rng.normal(0, 1, size=D.size) * sigma
    fit = laws.fit_form("silu", D, A, sigma=sigma)
    plain = laws.fit_form("silu", D, A)

    def silu(D, c, alpha, A0):
        return -c * D ** (-alpha) + A0

    p0 = [fit.params["c"], fit.params["alpha"], fit.params["A0"]]
    ref, _ = curve_fit(silu, D, A, p0=p0, sigma=sigma, maxfev=20000)
    assert fit.success and "weighted" in fit.message
    assert [fit.params[k] for k in ("c", "alpha", "A0")] == pytest.approx(list(ref), rel=1e-4)
    assert plain.params["A0"] != pytest.approx(fit.params["A0"], rel=1e-6)  # the weights matter
    with pytest.raises(UserError, match="positive, finite sigma"):
        laws.fit_form("silu", D, A, sigma=np.zeros(D.size))
