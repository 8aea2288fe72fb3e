"""Sparse updates of CETT probes (kernels.cett_update) against dense products and the reference search.

Kernel tests run on a GPU, or through Triton's interpreter on CPU in fp32:
    TRITON_INTERPRET=1 python -m pytest tests/test_cett_update.py -q
They skip where Triton is not importable or neither is available.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny import KERNEL_DEVICE, needs_kernel

from sparsinglaw import metrics
from sparsinglaw.backend import Backend, current, using
from sparsinglaw.kernels import cett_probe, cett_update

pytestmark = needs_kernel(cett_update)


@pytest.fixture(autouse=True)
def fused(monkeypatch):
    monkeypatch.setattr(metrics, "UPDATE_MIN_DH", 1)  # updates on these narrow test layers too
    with using(Backend(interpret=current().interpret)):  # every switch on
        yield


def sample(n_layers: int = 3, m: int = 80, d_f: int = 40, d_h: int = 24, seed: int = 0):
    """h with exact zeros (as after a ReLU) and neurons of different scales; W stored d_h-contiguous, as
    Model.w_stack stores it."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_layers, m, d_f, generator=g) * torch.rand(n_layers, 1, d_f, generator=g) * 2
    h[h.abs() < 0.2] = 0
    w = torch.randn(n_layers, d_f, d_h, generator=g).transpose(1, 2)
    return h.to(KERNEL_DEVICE), w.to(KERNEL_DEVICE), w.norm(dim=1).to(KERNEL_DEVICE)


def a_value(h, norms, layer: int, q: float) -> float:
    """A threshold equal to one of layer's a values: the search's thresholds sit on such boundaries."""
    a = (h[layer].abs().float() * norms[layer]).flatten().sort().values
    return float(a[int(q * (len(a) - 1))])


def dense_y(h, w, norms, layer: int, t: float) -> torch.Tensor:
    weak = torch.where(h[layer].abs().float() * norms[layer] <= t, h[layer], 0)
    return weak.double() @ w[layer].t().double()


def test_band_is_exactly_where_the_weak_test_changes():
    h, w, norms = sample()
    layers = torch.tensor([0, 2, 1], device=KERNEL_DEVICE)
    lo = torch.tensor([a_value(h, norms, 0, 0.3), a_value(h, norms, 2, 0.5), 0.0], device=KERNEL_DEVICE)
    hi = torch.tensor([a_value(h, norms, 0, 0.32), a_value(h, norms, 2, 0.5), a_value(h, norms, 1, 0.9)],
                      device=KERNEL_DEVICE)
    got = cett_update.band(h, norms, layers, lo, hi)
    for g, layer in enumerate(layers.tolist()):
        a = h[layer].abs().float() * norms[layer]
        want = torch.nonzero((a > lo[g]) & (a <= hi[g]))
        assert torch.equal(got[got[:, 0] == g][:, 1:], want)
    assert (got[:, 0] == 1).sum() == 0  # an empty band (lo == hi)


def test_updates_up_and_down_equal_dense_products():
    h, w, norms = sample()
    layers = torch.tensor([0, 1, 2], device=KERNEL_DEVICE)
    y = torch.empty(3, h.shape[1], w.shape[1], device=KERNEL_DEVICE)
    steps = [[0.5, 0.5, 0.2], [0.52, 0.3, 0.2], [0.51, 0.31, 0.9]]  # up, down, none, far up
    t = torch.tensor([a_value(h, norms, i, q) for i, q in enumerate(steps[0])], device=KERNEL_DEVICE)
    cett_probe.weak_norms(h, norms, w, layers, t, y=y)
    for qs in steps[1:]:
        new = torch.tensor([a_value(h, norms, i, q) for i, q in enumerate(qs)], device=KERNEL_DEVICE)
        got = cett_update.update(y, h, w, layers, t, new, norms)
        for i in range(3):
            want = dense_y(h, w, norms, i, float(new[i]))
            assert torch.allclose(y[i].double(), want, rtol=1e-5, atol=1e-5)
            assert torch.allclose(got[i].double(), want.norm(dim=1), rtol=1e-5, atol=1e-6)
        t = new


def test_cett_with_updates_equals_the_unfused_cett(monkeypatch):
    h, w, norms = sample()
    dense = metrics.DenseLayers.build(list(h), w, norms)
    with using(replace(current(), fused_probe=False)):
        plain = metrics.DenseLayers.build(list(h), w, norms)
    grid = dense.grids()
    layers = torch.tensor([0, 1, 2, 0, 2], device=KERNEL_DEVICE)
    # a search's pattern: far apart, then a few candidates and neighbours (pairs of one layer in one call)
    for i, x in enumerate(([9000, 9000, 30000], [9010, 9011, 30005], [9011, 29990, 29991], [900, 5000, 40000])):
        if i == 2:  # products freed (while other batches stream): the next probe starts from dense ones
            dense.drop_products()
            assert dense._y is None
        xs = torch.tensor([x[0], x[1], x[2], x[0] + 1, x[2] + 3], device=KERNEL_DEVICE)
        t = grid[layers, xs]
        assert torch.allclose(dense.cett(layers, t), plain.cett(layers, t), rtol=1e-5, atol=1e-7)
    assert dense.updated_probes > dense.dense_probes > 0
    # the fused grids (one layer's a at a time) are the unfused ones
    assert torch.equal(grid, plain.grids())


def test_search_with_updates_returns_the_reference_candidates(monkeypatch):
    h, w, norms = sample(n_layers=2, m=64, d_f=32, d_h=16, seed=3)
    search = metrics.ThresholdSearch(metrics.DenseLayers.build(list(h), w, norms))
    for tau in (0.2, 0.21, 0.205):
        got = search.thresholds(tau).tolist()
        want = [metrics.reference_layer_threshold(h[i], w[i], norms[i], tau) for i in range(2)]
        assert got == pytest.approx(want, rel=1e-6)
    assert search.dense.updated_probes > 0
    with using(replace(current(), probe_updates=False)):
        off = metrics.ThresholdSearch(metrics.DenseLayers.build(list(h), w, norms))
    assert off.thresholds(0.2).tolist() == pytest.approx(search.answers[0.2][0].tolist(), rel=1e-6)
    assert off.dense.updated_probes == 0
