"""Metrics, CETT threshold searches and CETT-PPL-p% checked against brute force and the authors' search."""

from __future__ import annotations

import json
import math

import pytest
import tiny
import torch

from sparsinglaw import metrics
from sparsinglaw.measure import measure, metric_label
from sparsinglaw.search import fast_search, reference_search
from sparsinglaw.sparse import Model, Rule, Thresholds, run_pass, sparsify


def _train(model: torch.nn.Module, steps: int = 80, seed: int = 0) -> list[torch.Tensor]:
    """Fit a tiny model to shifted copies of a random sequence for a few seconds, so that dropping
    neurons really costs perplexity (random weights barely react); return its evaluation batches."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(1, tiny.VOCAB, (48,), generator=g)
    seqs = torch.stack([base.roll(i) for i in range(16)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=seqs, labels=seqs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return list(seqs.split(4))


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = tiny.tiny_model("llama", act="silu")
    return model, _train(model)


@pytest.fixture(scope="module")
def trained_relu():
    torch.manual_seed(1)
    model = tiny.tiny_model("llama", act="relu")
    return model, _train(model, seed=1)


# --- CETT against brute force -------------------------------------------------------------------------

def _brute_cett(h: torch.Tensor, w: torch.Tensor, t: float) -> float:
    """Sum the weak neurons' output vectors n_i = h_i W[:, i] one by one, token by token."""
    errs = []
    for row in h.double():
        n = row[:, None] * w.double().t()  # (d_f, d_h): one output vector per neuron
        weak = n.norm(dim=1) <= t
        errs.append((n[weak].sum(0).norm() / n.sum(0).norm()).item())
    return sum(errs) / len(errs)


def test_cett_matches_brute_force_per_token_sum():
    torch.manual_seed(0)
    h = torch.randn(3, 20, 12)  # 3 layers, 20 tokens, d_f 12
    w = torch.randn(3, 5, 12)
    norms = w.norm(dim=1)
    dense = metrics.DenseLayers.build(list(h), w, norms)
    a = h.abs() * norms[:, None, :]
    for layer in range(3):
        for q in (0.1, 0.5, 0.9):
            t = torch.quantile(a[layer].flatten(), q).item()
            fast = dense.cett(torch.tensor([layer]), torch.tensor([t])).item()
            assert fast == pytest.approx(_brute_cett(h[layer], w[layer], t), rel=1e-5)


_FUSED_CHECK = """
import torch
from sparsinglaw import metrics
torch.manual_seed(4)
h, w = torch.randn(3, 37, 50), torch.randn(3, 21, 50)
dense = metrics.DenseLayers.build(list(h), w, w.norm(dim=1))
layers, t = torch.tensor([0, 2, 2, 1]), torch.tensor([0.5, 0.3, 1.2, 0.8])
from sparsinglaw.backend import Backend, using
assert dense.a is None  # the fused path is the one measured below: it needs no fp32 a
fused = dense.cett(layers, t)
with using(Backend(fused_probe=False, interpret=True)):
    plain_dense = metrics.DenseLayers.build(list(h), w, w.norm(dim=1))
    plain = plain_dense.cett(layers, t)
assert torch.allclose(fused, plain, rtol=1e-5), (fused, plain)
assert torch.equal(dense.grids(), plain_dense.grids())
print("ok", fused.tolist())
"""


def test_fused_probe_matches_the_unfused_cett():
    # the opt-in Triton kernel, run by Triton's interpreter on CPU in fp32 (the interpreter's bf16 dot is
    # not usable), in a fresh process because Triton binds its library to the interpreter at import;
    # skipped where Triton is not installed, as on CI
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _FUSED_CHECK], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]


@pytest.mark.parametrize("m,d_f", [(64, 32), (35, 57), (1, 777), (96, 128), (211, 57)])
def test_grids_are_the_reference_grid_for_any_size(m, d_f):
    # the 0.99 quantile's rank and weight are fp32 and torch.lerp switches formula at a weight of 0.5, as
    # in torch.quantile: every candidate must be bit-identical, whatever the count of a values
    torch.manual_seed(m * d_f)
    h = torch.randn(2, m, d_f) * torch.rand(2, 1, d_f) * 2
    w = torch.randn(2, 16, d_f)
    norms = w.norm(dim=1)
    grids = metrics.DenseLayers.build(list(h), w, norms).grids()
    for i in range(2):
        assert torch.equal(grids[i], metrics.reference_grid(h[i].abs().float() * norms[i]))


@pytest.mark.parametrize("m,d_f", [(512, 256), (600, 257), (1024, 96), (300, 1536), (40, 100)])
def test_grids_from_strided_columns_are_the_reference_grid(m, d_f):
    # the authors' stride numel // 65536 reaches every path: whole columns (512 x 256, 1024 x 96: stride 2
    # divides d_f), a stride across rows (600 x 257: 2; 300 x 1536: 7), or none (40 x 100), with a kept
    # (the unfused probe) or not (fused: a of the strided columns only, min a from column minima)
    torch.manual_seed(m + d_f)
    h = (torch.randn(2, m, d_f) * torch.rand(2, 1, d_f) * 2).to(torch.bfloat16)
    norms = torch.rand(2, d_f) + 0.5
    a = h.abs().float() * norms[:, None]
    for kept in (a, None):
        dl = metrics.DenseLayers(h=h, a=kept, w=torch.zeros(2, 4, d_f, dtype=h.dtype), norms=norms,
                                 y_norm=torch.ones(2, m))
        grids = dl.grids()
        for i in range(2):
            assert torch.equal(grids[i], metrics.reference_grid(a[i])), (i, kept is None)


def test_grid_top_is_the_quantile_of_whole_columns_where_the_stride_divides_d_f():
    """The authors' grid top, by hand: 1024 tokens x 256 neurons is 262,144 values, stride 262,144 //
    65,536 = 4, which divides 256, so `a.view(-1)[::4]` is columns 0, 4, 8, ... (64 columns, every token).
    Column c = 4j holds a = token index + 1 (1 .. 1024); every other column holds 1e6. Sorted, the
    subsample is each of 1 .. 1024 repeated 64 times; the 0.99 quantile's rank 0.99 * 65,535 = 64,879.65
    falls between sorted positions 64,879 and 64,880, both the value 64,879 // 64 + 1 = 1,014. So the grid
    runs from min a = 1 to exactly 1,014, whereas a quantile over every value would be 1e6."""
    m, d_f = 1024, 256
    a = torch.full((m, d_f), 1e6)
    a[:, ::4] = torch.arange(1, m + 1, dtype=torch.float32)[:, None]
    assert metrics.grid_stride(a.numel()) == 4
    want = torch.linspace(1.0, 1014.0, metrics.GRID_POINTS)
    assert torch.equal(metrics.reference_grid(a), want)
    for kept in (a[None], None):  # the unfused and the fused probe's path (norms 1: a = |h|)
        dl = metrics.DenseLayers(h=a[None].clone(), a=kept, w=torch.zeros(1, 4, d_f), norms=torch.ones(1, d_f),
                                 y_norm=torch.ones(1, m))
        assert torch.equal(dl.grids()[0], want)
    # a stride that does not divide d_f samples across rows: 1024 x 250 = 256,000 values, stride 3
    b = torch.arange(1, 1024 * 250 + 1, dtype=torch.float32).view(1024, 250)
    sub = b.flatten()[::3]
    assert metrics.grid_stride(b.numel()) == 3 and len(sub) == 85334
    assert torch.equal(metrics.reference_grid(b)[-1], torch.quantile(sub, 0.99))


def test_memoised_batched_search_returns_the_reference_candidates():
    torch.manual_seed(1)
    n_layers, m, d_f, d_h = 4, 1024, 128, 32
    h = torch.randn(n_layers, m, d_f) * torch.rand(n_layers, 1, d_f) * 2  # neurons of different scales
    w = torch.randn(n_layers, d_h, d_f)
    norms = w.norm(dim=1)
    search = metrics.ThresholdSearch(metrics.DenseLayers.build(list(h), w, norms))
    taus = (0.05, 0.5, 0.2, 0.21, 0.205)
    for tau in taus:
        got = search.thresholds(tau)
        want = [metrics.reference_layer_threshold(h[i], w[i], norms[i], tau) for i in range(n_layers)]
        assert got.tolist() == pytest.approx(want, rel=1e-6)
    # interpolated probes: well under the reference's 16 masked products per layer and tau
    assert search.evaluations / (len(taus) * n_layers) < 10
    # memoisation: a tau near earlier ones starts from a narrow bracket (the root finder's late rounds)
    before = search.evaluations
    search.thresholds(0.2075)
    assert search.evaluations - before <= 6 * n_layers


def test_search_with_a_silent_token_matches_the_reference_and_ends():
    # a token whose FFN output is exactly zero (ReLU, every neuron off) makes CETT 0/0 = NaN, which the
    # reference does not guard; the batched search must still end and return the reference's candidates
    torch.manual_seed(5)
    n_layers, m, d_f, d_h = 2, 64, 32, 8
    h = torch.relu(torch.randn(n_layers, m, d_f))
    h[:, 3] = 0.0
    w = torch.randn(n_layers, d_h, d_f)
    norms = w.norm(dim=1)
    search = metrics.ThresholdSearch(metrics.DenseLayers.build(list(h), w, norms))
    for tau in (0.1, 0.3):
        got = search.thresholds(tau)
        want = [metrics.reference_layer_threshold(h[i], w[i], norms[i], tau) for i in range(n_layers)]
        # every CETT is NaN, so both end on the top candidates, next to the 0.99 quantile, which the two
        # compute differently (selection vs torch.quantile): equal to fp32 rounding
        assert got.tolist() == pytest.approx(want, rel=1e-5)


def test_cett_threshold_is_largest_candidate_within_tau():
    torch.manual_seed(2)
    h, w = torch.randn(1, 50, 24), torch.randn(1, 8, 24)
    norms = w.norm(dim=1)
    dense = metrics.DenseLayers.build(list(h), w, norms)
    search = metrics.ThresholdSearch(dense)
    t = search.thresholds(0.25)
    grid = search.grid[0]
    i = int((grid == t[0]).nonzero()[0])
    assert dense.cett(torch.tensor([0]), t).item() <= 0.25
    assert dense.cett(torch.tensor([0]), grid[i + 1:i + 2]).item() > 0.25


class _Curve:
    """Stands in for DenseLayers: each layer's CETT is a given function of the threshold; counts probes."""

    def __init__(self, fns: list, top: float = 2.0):
        self.fns, self.n_layers, self.products, self.steps = fns, len(fns), 0, 0
        self.grid = torch.stack([torch.linspace(0.0, top, metrics.GRID_POINTS) for _ in fns])

    def grids(self) -> torch.Tensor:
        return self.grid

    def cett(self, layers: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.steps, self.products = self.steps + 1, self.products + len(layers)
        return torch.tensor([self.fns[i](x) for i, x in zip(layers.tolist(), t.tolist())], dtype=torch.float64)


def _bisect(fn, grid: torch.Tensor, tau: float) -> float:
    """The authors' bisection over the candidates (`reference_layer_threshold`), on a CETT function."""
    lo, hi = 0, len(grid) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fn(float(grid[mid])) > tau else (mid + 1, hi)
    return float(grid[lo - 1])


def test_search_aims_at_power_law_crossings_and_hands_its_exponents_to_the_next_batch():
    # CETT ~ (t / s)^k, as real layers nearly are (k 1.0-1.35): each batch's scale s differs by ~1%, as
    # batches do; batch i gets batch i-1's thresholds (and exponents) as its hint, as the fast search does
    curves = [_Curve([lambda t, k=k, s=s: min(1.0, (t / s) ** k) for k in (1.1, 1.25, 1.4)])
              for s in (5.0, 5.05, 4.97, 5.02)]
    searches = [metrics.ThresholdSearch(c) for c in curves]
    for tau in (0.1, 0.1015, 0.0995):
        hint = None
        for c, s in zip(curves, searches):
            before = c.products
            th = metrics.thresholds_all([s], tau, hint)[0]
            assert th.tolist() == [_bisect(fn, c.grid[0], tau) for fn in c.fns]
            assert s.answers[tau][1] == pytest.approx([1.1, 1.25, 1.4], rel=1e-3)
            # masked products per layer: from nothing known, a few; from the hint and its exponent, one
            # probe then the two candidates about the crossing; at a later tau, those two only
            most = 2 if tau != 0.1 else 3 if hint is not None else 6
            assert c.products - before <= most * c.n_layers
            hint = s


def test_search_falls_back_to_bisection_on_a_cliff_and_still_returns_the_reference_candidate():
    # CETT jumping over tau between two candidates: every power-law estimate misses, so the progress
    # safeguard must take over (bisection), keeping the worst case near the reference's 16 steps
    fns = [lambda t, c=c: 0.05 * t if t < c else 0.9 + 0.01 * t for c in (1.2345, 0.0101, 1.9876)]
    curve = _Curve(fns)
    th = metrics.ThresholdSearch(curve).thresholds(0.5)
    assert th.tolist() == [_bisect(fn, curve.grid[0], 0.5) for fn in fns]
    assert curve.steps <= 24  # (2 x 16 at worst)

# --- the four metrics' masks --------------------------------------------------------------------------

def test_topk_pooled_keeps_fraction_k_of_the_whole_tensor_and_per_token_keeps_k_each():
    torch.manual_seed(3)
    s = torch.randn(8, 16, 50)
    pooled = metrics.keep_topk_pooled(s, 0.2)
    assert pooled.float().mean().item() == pytest.approx(0.2, abs=1e-3)
    per_tok = metrics.keep_topk_per_token(s, 0.2)
    assert (per_tok.sum(-1) == 10).all()
    assert pooled.sum(-1).float().std() > 0  # pooled: per-token ratios vary


def test_fat_and_zero_masks_follow_their_definitions():
    s = torch.tensor([0.0, -0.05, 0.2, -0.3, 0.0, 1.0])
    assert metrics.keep_fat(s, 0.1).tolist() == [False, False, True, True, False, True]
    assert metrics.keep_zero(s).tolist() == [False, True, True, True, False, True]


def test_zero_metric_on_relu_counts_nonzero_activations_and_keeps_ppl(trained_relu):
    model, batches = trained_relu
    meas = measure(model, batches, "zero", progress=False)
    m = Model(model)
    nonzero, total = 0, 0
    seen: dict[int, torch.Tensor] = {}
    from sparsinglaw.sites import hooked

    def grab(i, h, s):
        seen[i] = s

    with torch.no_grad():
        for ids in batches:
            with hooked(m.sites, grab, need_s=True):
                model(input_ids=ids)
            for s in seen.values():
                nonzero += int((s != 0).sum())
                total += s.numel()
    assert meas.activation_ratio == pytest.approx(nonzero / total, rel=1e-9)
    assert meas.activation_ratio < 0.9
    assert meas.ppl_ratio == pytest.approx(1.0, abs=1e-6)


def test_topk_measurement_reports_k_and_exports_thresholds(trained):
    model, batches = trained
    meas = measure(model, batches, "topk", k=0.3, progress=False)
    assert meas.activation_ratio == pytest.approx(0.3, abs=0.01)
    assert meas.ppl_ratio > 1.0
    assert meas.thresholds is not None and meas.thresholds.kind == "abs"


def test_metric_labels_read_as_the_paper_writes_them():
    assert metric_label("ppl", {"p": 1.0}) == "CETT-PPL-1%"
    assert metric_label("ppl", {"p": 0.5, "tau": 0.1}) == "CETT-PPL-0.5%"
    assert metric_label("cett", {"tau": 0.2}) == "CETT (tau 0.2)"
    assert metric_label("topk", {"k": 0.3, "mode": "per-token"}) == "Top-k (k 0.3, per-token)"
    assert metric_label("fat", {"eps": 0.01}) == "FAT-eps (eps 0.01)"
    assert metric_label("zero", {}) == "zero"
    assert metric_label("ppl", {}) == "CETT-PPL"  # an old thresholds.json without its parameters


# --- CETT-PPL-p%: fast against the authors' reference -----------------------------------------------------

def test_fast_search_agrees_with_reference_search(trained):
    model, batches = trained
    m = Model(model)
    fast = fast_search(m, batches, p=1.0, progress=False)
    ref = reference_search(m, batches, p=1.0, tol=1e-5, progress=False)
    target = 1.01
    assert abs(fast.evaluation.ppl_ratio / target - 1) <= 1e-3  # realised PPL ratio within 0.1% of 1 + p
    assert fast.tau == pytest.approx(ref.tau, rel=0.02)
    assert abs(fast.evaluation.activation_ratio - ref.evaluation.activation_ratio) <= 0.002
    assert torch.allclose(fast.evaluation.thresholds, ref.evaluation.thresholds, rtol=0.02)
    assert fast.forward_passes < ref.forward_passes / 5


def test_fast_search_streams_batches_beyond_calibration_budget(trained):
    model, batches = trained
    m = Model(model)
    whole = fast_search(m, batches, p=1.0, progress=False)
    streamed = fast_search(m, batches, p=1.0, calib_tokens=batches[0].numel(), progress=False)
    assert streamed.evaluation.tokens == whole.evaluation.tokens
    assert abs(streamed.evaluation.ppl_ratio / 1.01 - 1) <= 2e-3
    assert streamed.tau == pytest.approx(whole.tau, rel=0.1)



# --- static thresholds: export, load, run sparsely ----------------------------------------------------------

def test_static_thresholds_roundtrip_and_sparsify_reproduce_static_check(trained, tmp_path):
    model, batches = trained
    meas = measure(model, batches, "ppl", p=1.0, progress=False)
    assert meas.static is not None
    # the headline (the monotone fit's crossing) with its band, and the search's evaluated answer
    d = meas.to_json()
    lo, hi = d["activation_ratio_interval"]
    assert lo <= d["activation_ratio"] <= hi and d["tau_interval"][0] <= d["cett"] <= d["tau_interval"][1]
    assert d["ppl_ratio_sigma"] > 0 and d["uncertainty"]["level"] == 0.95 and d["uncertainty"]["resamples"] == 1000
    assert d["search"]["acceptance"]["loose"] == 3e-4 and d["search"]["status"] == 0
    ev = d["search"]["evaluated"]
    assert ev["ppl_ratio"] == d["ppl_ratio"] and lo <= ev["activation_ratio"] <= hi
    assert meas.thresholds.params["tau"] == ev["tau"]  # the exported thresholds are the evaluated answer's
    summary = meas.summary()
    assert f"[{lo:.4f}, {hi:.4f}]" in summary and "95% band" in summary and "evaluated answer" in summary
    meas.thresholds.save(tmp_path / "thresholds.json")
    th = Thresholds.load(tmp_path / "thresholds.json")
    assert th.thresholds == pytest.approx(meas.thresholds.thresholds)
    ratios = []
    with torch.no_grad():
        for ids in batches:
            dense = model(input_ids=ids, labels=ids).loss.item()
            with sparsify(model, tmp_path / "thresholds.json"):
                sparse = model(input_ids=ids, labels=ids).loss.item()
            ratios.append(math.exp(sparse - dense))
    assert sum(ratios) / len(ratios) == pytest.approx(meas.static["ppl_ratio"], rel=1e-5)
    again = measure(model, batches, thresholds=th, progress=False)
    assert again.regime == "static"
    assert again.ppl_ratio == pytest.approx(meas.static["ppl_ratio"], rel=1e-6)
    data = json.loads((tmp_path / "thresholds.json").read_text())
    assert [layer["index"] for layer in data["layers"]] == list(range(len(th.thresholds)))


def test_cett_rule_drops_neurons_below_threshold_over_column_norm(trained):
    model, batches = trained
    m = Model(model)
    th = torch.tensor([0.05] * m.n_layers)
    r = run_pass(m, batches[0], Rule("cett", thresholds=th), detail=True)
    assert 0 < r.layer_ratio.mean() < 1


# --- the reference is the authors' procedure: an independent implementation (tests/authors.py) ------------

def test_reference_search_retraces_an_independent_implementation_of_the_authors(trained):
    """2 batches of 16 x 128 tokens: 2,048 per batch x 64 neurons, so the grid's stride is 2 and its top the
    quantile over every other neuron column (the authors' quirk). Every bisection round (tau, PPL ratio,
    activation ratio) and every per-layer threshold must match, and the answer is the final midpoint."""
    import authors

    model, train = trained
    seqs = torch.cat(train).repeat(2, 3)[:, :128]  # the training sequences (period 48), 32 of 128 tokens
    batches = [seqs[:16], seqs[16:]]
    ref = reference_search(Model(model), batches, p=1.0, tol=1e-3, progress=False)
    theirs = authors.cett_ppl(model, batches, 1.0, 1e-3)
    assert [h["tau"] for h in ref.history] == [r["tau"] for r in theirs]
    assert len(theirs) == 11 and ref.tau == theirs[-1]["tau"]  # 10 halvings to 1e-3, then the midpoint
    for h, r in zip(ref.history, theirs):
        assert h["ppl_ratio"] == pytest.approx(r["ppl_ratio"], rel=1e-6, abs=0)
        assert h["activation_ratio"] == pytest.approx(r["activation_ratio"], abs=1e-6)
    ours = ref.evaluation.thresholds
    assert ours.shape == (2, 2)
    assert torch.allclose(ours.double(), torch.tensor(theirs[-1]["thresholds"], dtype=torch.float64), rtol=1e-6,
                          atol=0)
    # the headline comes with its band, which holds the bisection's answer here (many evaluations near it)
    b = ref.band
    assert b is not None and b.tau_interval[0] <= ref.tau <= b.tau_interval[1]
    assert b.activation_ratio_interval[0] <= ref.evaluation.activation_ratio <= b.activation_ratio_interval[1]


@pytest.mark.slow
def test_smollm2_thresholds_and_bisection_are_the_authors():
    """SmolLM2-135M, fp32 CPU, 2,048 tokens (4 x 512: stride 48 divides d_f 1,536, so the grid's top is the
    quantile of 32 neuron columns): at tau 0.1 every layer's threshold equals the independent
    implementation's (both searches), the activation ratio within 1e-4; the reference retraces their
    bisection round by round (tol 0.05: 5 halvings and the final midpoint). About 10 minutes on one thread."""
    import authors

    from sparsinglaw.data import eval_batches
    from sparsinglaw.models import load_model

    lm = load_model("smollm2-135m", device="cpu", dtype="fp32")
    batches = eval_batches(lm.tokenizer, None, 2048, 512, 4)
    model, m = lm.model, Model(lm.model)
    assert metrics.grid_stride(2048 * 1536) == 48
    _, hs = authors.dense(model, batches[0])
    theirs = [authors.layer_threshold(h, d.weight, 0.1) for h, d in zip(hs, authors._downs(model))]
    dense = run_pass(m, batches[0], Rule("dense"), capture=True)
    ref = [metrics.reference_layer_threshold(h, m.w_stack[i], m.norms[i], 0.1) for i, h in enumerate(dense.dense_h)]
    fast = metrics.ThresholdSearch(metrics.DenseLayers.build(dense.dense_h, m.w_stack, m.norm_stack)).thresholds(0.1)
    assert ref == pytest.approx(theirs, rel=1e-6, abs=0) and fast.tolist() == pytest.approx(theirs, rel=1e-6, abs=0)
    _, act = authors.sparse(model, batches[0], theirs)
    ours = run_pass(m, batches[0], Rule("cett_authors", thresholds=torch.tensor(ref)), detail=True)
    assert abs(float(ours.layer_ratio.mean()) - act) <= 1e-4
    res = reference_search(m, batches, p=1.0, tol=0.05, progress=False)
    steps = authors.cett_ppl(model, batches, 1.0, 0.05)
    assert [h["tau"] for h in res.history] == [s["tau"] for s in steps] and len(steps) == 6
    for h, s in zip(res.history, steps):
        assert h["ppl_ratio"] == pytest.approx(s["ppl_ratio"], rel=1e-6, abs=0)
        assert abs(h["activation_ratio"] - s["activation_ratio"]) <= 1e-4
