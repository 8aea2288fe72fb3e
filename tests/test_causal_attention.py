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

from sparsinglaw.backend import current, using
from sparsinglaw.patches import CAUSAL_FAMILIES, causal_attention
from sparsinglaw.sparse import Model, Rule, run_pass


def passes(model: torch.nn.Module, seq: int = 16) -> list:
    m = Model(model)
    ids = torch.randint(0, model.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))
    th = torch.full((m.n_layers,), 0.05)
    return [run_pass(m, ids, Rule("dense")), run_pass(m, ids, Rule("cett", thresholds=th), detail=True)]


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
