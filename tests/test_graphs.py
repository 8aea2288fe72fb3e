"""CUDA-graphed CETT passes (sparse.GraphedPass) against eager ones, bit for bit. Needs a GPU; skipped elsewhere.

transformers counts CUDA stream capture as tracing and then builds the causal mask instead of passing
`is_causal=True`, so a graphed pass's SDPA would run another attention kernel (a tiny Llama's loss moves by
up to 3.6e-4; GPT-2, which builds no mask, by 0). `patches.causal_attention` makes every pass attend
through is_causal without a mask, captured or not.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny import tiny_model

from sparsinglaw.backend import current, using
from sparsinglaw.sparse import Model, Rule, run_pass

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("positions", ["all", "labeled"])
def test_graphed_passes_match_eager_ones(family, positions, monkeypatch):
    model = tiny_model(family).cuda().to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (2, 32), generator=gen).cuda() for _ in range(3)]
    m = Model(model)
    ths = [torch.full((m.n_layers,), v, device="cuda") for v in (0.01, 0.05, 0.2)]
    runs = [(ids, th) for th in ths for ids in batches]
    graphed = [run_pass(m, ids, Rule("cett", thresholds=th), positions, detail=True) for ids, th in runs]
    assert not m.graphs_failed, m.graphs_failed
    assert all(g.graph is not None for g in m._graphs.values())
    with using(replace(current(), cuda_graphs=False)):
        eager = [run_pass(Model(model), ids, Rule("cett", thresholds=th), positions, detail=True)
                 for ids, th in runs]
    # per run: a result aliasing a later replay's outputs would carry another threshold's kept counts
    for i, (g, e) in enumerate(zip(graphed, eager)):
        assert g.loss == e.loss, (i, g.loss - e.loss)
        assert torch.equal(g.kept, e.kept) and torch.equal(g.neuron_kept, e.neuron_kept), i
        assert torch.equal(g.token_ratio, e.token_ratio), i
