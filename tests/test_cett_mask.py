"""The fused CETT mask (kernels.cett_mask) against the torch path, and the torch path against the search.

Kernel tests run through Triton's interpreter on CPU in fp32 (its bf16 is unreliable):
    TRITON_INTERPRET=1 python -m pytest tests/test_cett_mask.py -q
They skip when Triton is not importable or the interpreter is off; the torch-path tests always run.
"""

from __future__ import annotations

import pytest
import torch

from sparsinglaw import metrics
from sparsinglaw.backend import Backend, current, using
from sparsinglaw.kernels import cett_mask
from sparsinglaw.sparse import Model, Rule, counted_positions, run_pass

needs_interpreter = pytest.mark.skipif(
    cett_mask.triton is None or not current().interpret,
    reason="needs Triton, run through its interpreter (TRITON_INTERPRET=1 set before triton is imported)")


def reference_keep(h: torch.Tensor, norms: torch.Tensor, t: float) -> torch.Tensor:
    """The threshold search's own test (`DenseLayers`): weak when fp32(|h|) * norms <= t; NaN kept."""
    return ~(h.abs().float() * norms.float() <= torch.tensor(t, dtype=torch.float32))


def torch_counts(h: torch.Tensor, norms: torch.Tensor, t: float, seq: int, positions: str):
    """What run_pass's torch path computes: the mask, per-neuron counts over counted rows, first-sequence
    per-row counts."""
    keep = metrics.keep_cett(h, norms, torch.tensor(t))
    flat = keep.reshape(-1, keep.shape[-1])
    counted = counted_positions(torch.zeros(flat.shape[0] // seq, seq), positions).flatten()
    col = flat[counted].sum(0, dtype=torch.int32)
    return torch.where(keep, h, 0), col, flat[:seq].sum(-1, dtype=torch.int32)


def sample(batch: int, seq: int, d_f: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, d_f, generator=g)
    h[h.abs() < 0.3] = 0  # exact zeros, as after a ReLU
    norms = torch.rand(d_f, generator=g) + 0.5
    return h, norms


def quantile(h: torch.Tensor, norms: torch.Tensor, q: float) -> float:
    """A threshold that is exactly one of the a values (the boundary case the search produces)."""
    a = (h.abs().float() * norms).flatten().sort().values
    return float(a[min(len(a) - 1, int(q * len(a)))])


# --- the torch path (always runs) -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_keep_is_the_search_test_at_exact_boundaries(dtype):
    h, norms = sample(3, 7, 45)
    h = h.to(dtype)
    h[0, 1, 2] = float("nan")
    for q in (0.0, 0.25, 0.5, 0.9, 1.0):
        t = quantile(h.float().nan_to_num(0), norms, q)
        want = reference_keep(h, norms, t)
        for budget in (None, 45, 100, 10**6):  # chunks of one row, of two rows, one chunk
            got = metrics.keep_cett(h, norms, torch.tensor(t), budget=budget)
            assert torch.equal(got, want)
        assert bool(got[0, 1, 2])  # NaN is kept, as `not (a <= t)`
    assert metrics.keep_cett(h, norms, -1.0).all()


def test_torch_keep_drops_a_equal_t_where_the_quotient_test_keeps():
    """At t = a exactly the neuron is dropped; `|h| > t / norms` (the old test) can round the other way."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4096, generator=g).to(torch.bfloat16)
    norms = torch.rand(4096, generator=g) + 0.5
    a = h.abs().float() * norms
    quotient_keeps = h.abs() > a / norms  # each neuron at its own t = a_k
    ks = quotient_keeps.nonzero().flatten()[:8]
    assert len(ks) > 0
    for k in ks.tolist():
        assert not bool(metrics.keep_cett(h[k:k + 1], norms[k:k + 1], a[k])[0])


# --- the fused kernel through the interpreter -----------------------------------------------------------

@needs_interpreter
@pytest.mark.parametrize("positions", ["all", "labeled"])
@pytest.mark.parametrize("q", [-1.0, 0.5, 1.0])  # drops nothing, about half, everything
@pytest.mark.parametrize("blocks,tiles", [((8, 16), None), ((4, 32), 3), ((16, 16), 1)])
def test_kernel_matches_torch_path(positions, q, blocks, tiles):
    batch, seq, d_f = 3, 13, 45  # 39 rows: neither is a multiple of any block size
    h, norms = sample(batch, seq, d_f, seed=2)
    h[1, 4, 7] = float("nan")
    h[0, 0, 0] = float("nan")
    t = -1.0 if q < 0 else quantile(h.nan_to_num(0), norms, q)
    if q == 1.0:
        t = float("inf")
    out, col, rows = cett_mask.apply(h, norms, torch.tensor(t), seq=seq if positions == "labeled" else None,
                                     row_counts=seq, blocks=blocks, tiles=tiles)
    want_out, want_col, want_rows = torch_counts(h, norms, t, seq, positions)
    assert out.shape == h.shape and out.dtype == h.dtype
    assert torch.equal(out.nan_to_num(123.0), want_out.nan_to_num(123.0))
    assert torch.equal(out.isnan(), want_out.isnan())
    assert torch.equal(col, want_col) and col.dtype == torch.int32
    assert torch.equal(rows, want_rows) and rows.dtype == torch.int32
    n_counted = batch * (seq - (positions == "labeled"))
    if q < 0:
        assert int(col.sum()) == n_counted * d_f
    elif q == 1.0:  # only the NaNs survive
        assert int(col.sum()) == 2 and int(rows.sum()) == 1  # both NaNs sit on counted rows
    else:
        assert 0.3 < col.sum().item() / (n_counted * d_f) < 0.7


@needs_interpreter
def test_kernel_handles_flat_rows_noncontiguous_h_and_no_row_counts():
    h, norms = sample(2, 9, 37, seed=3)
    t = quantile(h, norms, 0.4)
    wide = torch.zeros(18, 50)
    wide[:, :37] = h.reshape(18, 37)
    view = wide[:, :37]  # rows with a stride of 50: the kernel takes the row stride as is
    out, col, rows = cett_mask.apply(view, norms, t, seq=9, blocks=(8, 16))
    want_out, want_col, _ = torch_counts(h, norms, t, 9, "labeled")
    assert torch.equal(out, want_out.reshape(18, 37)) and torch.equal(col, want_col) and rows.numel() == 0
    tall = torch.randn(70, 40, dtype=torch.float64)[:, ::2].float()  # last-dim stride 2: copied first
    out, col, _ = cett_mask.apply(tall, norms[:20], 0.5, blocks=(8, 16))
    assert torch.equal(out, torch.where(reference_keep(tall, norms[:20], 0.5), tall, 0))


def test_tiles_per_program_fills_the_gpu_and_bounds_atomics():
    assert cett_mask.tiles_per_program(1, 1) == 1
    assert cett_mask.tiles_per_program(512, 8) == 4  # 16K tokens x 1,920: 1,024 programs
    big = cett_mask.tiles_per_program(32768, 79)  # 1M tokens x 20,000
    assert big == cett_mask.MAX_TILES and -(-32768 // big) * 79 >= cett_mask.TARGET_PROGRAMS


def test_enabled_follows_the_backend():
    h = torch.zeros(2, 3)
    with using(Backend(fused_mask=False, interpret=True)):
        assert not cett_mask.enabled(h)
    with using(Backend(interpret=False)):
        assert not cett_mask.enabled(h)  # CPU and not interpreted: the torch path
    with using(Backend(interpret=True)):
        assert cett_mask.enabled(h) == (cett_mask.triton is not None)


@needs_interpreter
@pytest.mark.parametrize("positions", ["all", "labeled"])
def test_run_pass_fused_equals_torch_path(tiny_model, monkeypatch, positions):
    model = tiny_model("llama", act="relu")
    m = Model(model)
    ids = torch.randint(0, 300, (3, 11), generator=torch.Generator().manual_seed(4))
    dense = run_pass(m, ids, Rule("dense"), positions, capture=True)
    th = torch.stack([h.abs().float().mul(n).flatten().median() for h, n in zip(dense.dense_h, m.norms)])
    calls = []

    def counting_apply(*args, **kwargs):
        calls.append(kwargs)
        return apply(*args, **kwargs)

    apply = cett_mask.apply
    monkeypatch.setattr(cett_mask, "apply", counting_apply)
    results = {}
    for flag in ("0", "1"):
        with using(Backend(fused_mask=flag == "1", interpret=True)):
            results[flag] = run_pass(m, ids, Rule("cett", thresholds=th), positions, detail=True)
        assert len(calls) == (m.n_layers if flag == "1" else 0)  # the kernel served every layer, or none
    plain, fused = results["0"], results["1"]
    assert fused.loss == plain.loss
    assert torch.equal(fused.kept, plain.kept)
    assert torch.equal(fused.neuron_kept, plain.neuron_kept)
    assert torch.equal(fused.token_ratio, plain.token_ratio)
    assert 0 < float(plain.layer_ratio.mean()) < 1
