"""The noise of the PPL ratio and the CETT-PPL-p% band, against closed forms and brute force."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import tiny
import torch

from sparsinglaw import uncertainty
from sparsinglaw.sparse import BLOCK_TOKENS, Model, Rule, block_tokens, lm_loss, run_pass


def test_block_losses_sum_to_the_loss_and_count_every_predicted_token():
    torch.manual_seed(0)
    logits = torch.randn(3, 300, 17)
    ids = torch.randint(0, 17, (3, 300))
    loss, blocks = lm_loss(logits, ids)
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 17), ids[:, 1:].reshape(-1),
                                                  reduction="none").double().view(3, 299)
    assert loss.item() == pytest.approx(per_token.mean().item(), rel=1e-12)
    counts = block_tokens(ids.shape)
    assert counts.tolist() == [BLOCK_TOKENS, BLOCK_TOKENS, 299 - 2 * BLOCK_TOKENS] * 3
    # block j of sequence i holds tokens j*128 .. of that sequence
    want = torch.stack([per_token[:, lo:lo + BLOCK_TOKENS].sum(1) for lo in range(0, 299, BLOCK_TOKENS)], 1)
    assert torch.allclose(blocks, want.flatten(), rtol=1e-12)


def test_every_pass_carries_its_block_losses():
    model = tiny.tiny_model("llama")
    m = Model(model)
    ids = torch.randint(1, tiny.VOCAB, (2, 40))
    r = run_pass(m, ids, Rule("cett", thresholds=torch.full((2,), 1e-3)))
    assert r.block_loss.shape == (2,) and r.block_tokens.tolist() == [39.0, 39.0]
    assert r.block_loss.sum().item() / 78 == pytest.approx(r.loss, rel=1e-12)


def _ev(tau, blocks, act=0.5, tokens=None):
    """An evaluation as the band reads it: F from the blocks by the authors' aggregation."""
    f = float(np.mean([math.exp(d.sum() / c.sum()) for d, c in blocks]))
    return SimpleNamespace(tau=tau, ppl_ratio=f, activation_ratio=act, blocks=blocks,
                           tokens=tokens or int(sum(c.sum() for _, c in blocks)))


def test_bootstrap_noise_matches_the_delta_method():
    """sd of F = sqrt(sum_b exp(2 m_b) var(x_b) / n_b) / B for B batches of n_b equal blocks with mean
    per-token dloss m_b (var: the blocks' population variance of their mean dloss, as a bootstrap sees it)."""
    rng = np.random.default_rng(3)
    blocks = []
    for _ in range(3):
        x = rng.normal(0.01, 0.05, size=64)  # mean dloss per token of each 128-token block
        blocks.append((x * 128, np.full(64, 128.0)))
    ev = _ev(0.1, blocks)
    delta = math.sqrt(sum(math.exp(2 * (d / c).mean()) * (d / c).var() / len(d) for d, c in blocks)) / 3
    sd = uncertainty.f_sigma(ev, uncertainty.Noise(resamples=20000))
    assert sd == pytest.approx(delta, rel=0.03)


def _brute_isotonic(y, w):
    """The min-max formula: fit_i = max_{j <= i} min_{k >= i} weighted mean of y[j..k]."""
    n = len(y)
    out = []
    for i in range(n):
        out.append(max(min(np.average(y[j:k + 1], weights=w[j:k + 1]) for k in range(i, n)) for j in range(i + 1)))
    return np.array(out)


@pytest.mark.parametrize("seed", range(5))
def test_isotonic_fit_is_the_min_max_formula(seed):
    rng = np.random.default_rng(seed)
    y = np.cumsum(rng.normal(0.1, 1.0, size=12))
    w = rng.uniform(0.2, 3.0, size=12)
    assert np.allclose(uncertainty.isotonic(y, w), _brute_isotonic(y, w), rtol=1e-12, atol=1e-12)


def _curve_evals(taus, noise_sd, n_blocks, rng, tau_star=0.05, k=1.5, target=1.01):
    """Evaluations of a power-law curve ln F = ln(target) (tau / tau_star)^k with per-block noise."""
    out = []
    for tau in taus:
        mean = math.log(target) * (tau / tau_star) ** k
        x = rng.normal(0.0, noise_sd, size=n_blocks)
        x = x - x.mean() + mean  # F exactly on the curve, the blocks' spread as given
        out.append(_ev(tau, [(x * 128, np.full(n_blocks, 128.0))], act=0.3 - 0.1 * math.log(tau / tau_star)))
    return out


def test_band_crosses_where_the_curve_does_and_narrows_as_one_over_sqrt_tokens():
    rng = np.random.default_rng(0)
    taus = [0.02, 0.035, 0.045, 0.05, 0.055, 0.07, 0.1]
    small = uncertainty.band(_curve_evals(taus, 0.005, 16, rng), 1.01)
    big = uncertainty.band(_curve_evals(taus, 0.005, 256, rng), 1.01)
    for b in (small, big):
        # the crossing of the (already monotone) curve, interpolated linearly in ln tau between 0.05 +- 10%
        assert b.tau == pytest.approx(0.05, rel=2e-3)
        assert b.activation_ratio == pytest.approx(0.3, abs=2e-3)
        assert b.tau_interval[0] < 0.05 < b.tau_interval[1]
        lo, hi = b.activation_ratio_interval
        assert lo < b.activation_ratio < hi and not b.unbounded
    # 16x the tokens: a quarter of the width (the curve is nearly straight over either band)
    assert big.width == pytest.approx(small.width / 4, rel=0.15)
    assert small.tokens_for(small.width / 2) == 4 * small.tokens
    # the band's ends are where |F - target| = z sigma on the curve
    z = 1.959963984540054
    sd = uncertainty.f_sigma(_curve_evals([0.05], 0.005, 16, np.random.default_rng(0))[0])
    lnf_hi = math.log(1.01 + z * sd)
    assert small.tau_interval[0] == pytest.approx(0.05 * (math.log(1.01 - z * sd) / math.log(1.01)) ** (1 / 1.5),
                                                  rel=0.03)
    assert small.tau_interval[1] == pytest.approx(0.05 * (lnf_hi / math.log(1.01)) ** (1 / 1.5), rel=0.03)


def test_band_does_not_depend_on_which_taus_were_evaluated():
    """Two searches' evaluations of one curve (different taus) give nearly the same headline and band."""
    rng = np.random.default_rng(1)
    a = uncertainty.band(_curve_evals([0.1, 0.04, 0.052, 0.049], 0.05, 64, rng), 1.01)
    b = uncertainty.band(_curve_evals([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.046875, 0.0546875, 0.05078125], 0.05,
                                      64, rng), 1.01)
    assert a.activation_ratio == pytest.approx(b.activation_ratio, abs=3e-3)
    assert a.activation_ratio_interval[0] <= b.activation_ratio <= a.activation_ratio_interval[1]
    assert b.activation_ratio_interval[0] <= a.activation_ratio <= b.activation_ratio_interval[1]


def test_band_over_a_non_monotone_f_uses_the_monotone_fit():
    """F that dips below the target after crossing it (a noisy step function): one headline, between the
    crossings, and a band holding all of them."""
    rng = np.random.default_rng(2)
    evs = _curve_evals([0.03, 0.04, 0.045, 0.05, 0.055, 0.06, 0.08], 0.05, 64, rng)
    bumped = []
    for e, bump in zip(evs, [0, 0, 0.003, -0.004, 0.002, 0, 0]):
        d, c = e.blocks[0]
        bumped.append(_ev(e.tau, [(d + bump * c / len(c) * len(c), c)], e.activation_ratio))
    f = [e.ppl_ratio for e in bumped]
    assert any(x > 1.01 for x in f[:3]) and f[3] < 1.01  # crosses up, then back down, then up again
    b = uncertainty.band(bumped, 1.01)
    assert 0.045 <= b.tau <= 0.055
    assert b.tau_interval[0] <= 0.045 and b.tau_interval[1] >= 0.055


def test_band_without_block_losses_is_none():
    ev = SimpleNamespace(tau=0.1, ppl_ratio=1.01, activation_ratio=0.5, blocks=[], tokens=100)
    assert uncertainty.band([ev], 1.01) is None and uncertainty.f_sigma(ev) is None
