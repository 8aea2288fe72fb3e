"""patches.causal_attention: passes attend through SDPA's is_causal without a mask being built, and give
exactly what transformers' own SDPA path gives (which, unpadded and uncached, builds no mask either).

On a GPU this is what makes a CUDA-graphed pass equal an eager one (tests/test_graphs.py); here, on CPU,
it must change nothing at all.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny import buildable, tiny_config, tiny_model
from transformers import AutoModelForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from sparsinglaw import patches
from sparsinglaw.backend import current, using
from sparsinglaw.patches import CAUSAL_FAMILIES, causal_attention
from sparsinglaw.sparse import Model, Rule, run_pass


def passes(model: torch.nn.Module, seq: int = 16) -> list:
    m = Model(model)
    ids = torch.randint(0, model.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))
    th = torch.full((m.n_layers,), 0.05)
    return [run_pass(m, ids, Rule("dense")), run_pass(m, ids, Rule("cett", thresholds=th), detail=True)]


KNOWN = pytest.mark.skipif(not patches.supported(), reason="a transformers version the patches do not know")


@KNOWN
@pytest.mark.parametrize("family", [f for f in CAUSAL_FAMILIES if f in buildable()])
def test_passes_equal_transformers_own_sdpa_and_build_no_mask(family, monkeypatch):
    model = tiny_model(family)
    assert model.config._attn_implementation == "sdpa"
    with causal_attention(model, 16) as applied:
        assert applied
    assert model.config._attn_implementation == "sdpa"  # restored
    with using(replace(current(), causal_sdpa=False)):  # transformers' own path: the patch off
        want = passes(model)

    def no_mask(*args, **kwargs):
        raise AssertionError("a mask was built")

    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa", no_mask)
    got = passes(model)
    for g, w in zip(got, want):
        assert g.loss == w.loss
        assert torch.equal(g.kept, w.kept)
    assert torch.equal(got[1].neuron_kept, want[1].neuron_kept)
    assert torch.equal(got[1].token_ratio, want[1].token_ratio)


@KNOWN
def test_left_alone_where_a_mask_is_more_than_causal():
    mistral = tiny_model("mistral") if "mistral" in buildable() else None
    if mistral is not None:
        mistral.config.sliding_window = 8  # shorter than the sequence: the mask is banded
        with causal_attention(mistral, 16) as applied:
            assert not applied
        with causal_attention(mistral, 8) as applied:  # as long as the sequence: plain causal
            assert applied
    with causal_attention(tiny_model("gpt2"), 16) as applied:  # not a family it knows
        assert not applied
    cfg = tiny_config("llama")
    cfg._attn_implementation = "eager"
    with causal_attention(AutoModelForCausalLM.from_config(cfg), 16) as applied:  # the user chose eager
        assert not applied


def test_every_patch_steps_aside_on_a_transformers_version_it_does_not_know(monkeypatch):
    from sparsinglaw import patches

    assert patches.supported("5.17.0") and patches.supported("5.25.0.dev0")
    assert not patches.supported("5.9.0") and not patches.supported("6.0.0") and not patches.supported("x")
    model = tiny_model("llama")
    want = passes(model)
    monkeypatch.setattr(patches, "supported", lambda version=None: False)
    with causal_attention(model, 16) as applied, patches.fused_rope(model) as rope, \
            patches.fused_norm(model) as norms:
        assert not applied and not rope and norms == 0
    got = passes(model)  # transformers' own path gives the same pass
    for g, w in zip(got, want):
        assert abs(g.loss - w.loss) <= 1e-6 * abs(w.loss) and torch.equal(g.kept, w.kept)
