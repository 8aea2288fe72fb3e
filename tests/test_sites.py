"""FFN sites of every family: the h and s the hooks see, column norms, masking, hook hygiene, errors."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import tiny
import torch
import torch.nn.functional as F
from torch import nn

from sparsinglaw.errors import UserError
from sparsinglaw.sites import ADAPTERS, Adapter, activation_name, ffn_sites, hooked, register

FAMILIES = tiny.families()

# Independent of sites.ADAPTERS: where each family's layers are and what feeds its FFN activation.
# (layers, gate-or-fc1, up): gated FFNs have h = act(gate x) * (up x); vanilla ones h = act(fc1 x + b).
_LLAMA = ("model.layers", "mlp.gate_proj", "mlp.up_proj")
_UP_ACT_DOWN = ("model.layers", "mlp.up_proj", None)
INPUTS = {
    **dict.fromkeys(("llama", "mistral", "ministral", "qwen2", "qwen3", "smollm3", "olmo", "olmo2", "olmo3",
                     "granite", "helium", "exaone4", "gemma", "gemma2", "gemma3_text", "vaultgemma", "cohere",
                     "stablelm"), _LLAMA),
    **dict.fromkeys(("nemotron", "arcee", "jais2"), _UP_ACT_DOWN),
    "gemma3": ("model.language_model.layers", "mlp.gate_proj", "mlp.up_proj"),
    "phi3": ("model.layers", "mlp.gate_up_proj", "fused"),
    "phi": ("model.layers", "mlp.fc1", None),
    "nanochat": ("model.layers", "mlp.fc1", None),
    "gpt2": ("transformer.h", "mlp.c_fc", None),
    "gpt_neo": ("transformer.h", "mlp.c_fc", None),
    "gpt_bigcode": ("transformer.h", "mlp.c_fc", None),
    "starcoder2": ("model.layers", "mlp.c_fc", None),
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_h_to_4h", None),
    "persimmon": ("model.layers", "mlp.dense_h_to_4h", None),
    "falcon": ("transformer.h", "mlp.dense_h_to_4h", None),
    "opt": ("model.decoder.layers", "fc1", None),
    "xglm": ("model.layers", "fc1", None),
}
_C = math.sqrt(2 / math.pi)
ACTS = {
    "silu": lambda x: x * torch.sigmoid(x),
    "relu": lambda x: x.clamp_min(0),
    "relu2": lambda x: x.clamp_min(0) ** 2,
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "gelu_new": lambda x: 0.5 * x * (1 + torch.tanh(_C * (x + 0.044715 * x**3))),
    "gelu_pytorch_tanh": lambda x: 0.5 * x * (1 + torch.tanh(_C * (x + 0.044715 * x**3))),
}


def _get(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _linear(mod, x):
    """mod(x) from its weights: nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out)."""
    if type(mod).__name__ == "Conv1D":
        return x @ mod.weight + mod.bias
    return F.linear(x, mod.weight, mod.bias)


def _ids(batch=2, seq=7, seed=0):
    return torch.randint(3, tiny.VOCAB - 4, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _run(model, sites, need_s, ids):
    """One forward inside `hooked`; returns per-site (x at the FFN input, h, s)."""
    layers_path, first, _ = INPUTS[model.config.model_type]
    layers = _get(model, layers_path)
    xs, seen = {}, {}
    handles = [_get(layer, first).register_forward_pre_hook(lambda _m, a, i=i: xs.__setitem__(i, a[0]))
               for i, layer in enumerate(layers)]
    try:
        with hooked(sites, lambda i, h, s: seen.__setitem__(i, (h.clone(), s.clone())), need_s=need_s):
            model(ids)
    finally:
        for hd in handles:
            hd.remove()
    return {i: (xs[i], *seen[i]) for i in seen}


def test_every_buildable_family_is_covered():
    assert set(FAMILIES) <= set(INPUTS)
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3", "phi",
            "gpt2", "gpt_neox", "opt"} <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_site_per_layer(family):
    model = tiny.tiny_model(family)
    sites = ffn_sites(model)
    layers = _get(model, INPUTS[family][0])
    assert [s.index for s in sites] == list(range(tiny.LAYERS)) == list(range(len(layers)))
    assert all(s.gated == (INPUTS[family][2] is not None) for s in sites)
    assert all(s.d_ff == tiny.D_FF for s in sites)
    for s, layer in zip(sites, layers, strict=True):
        assert any(m is s.down for m in layer.modules()) and any(m is s.act for m in layer.modules())
    assert len({id(s.act) for s in sites}) == len({id(s.down) for s in sites}) == len(sites)


@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_see_h_and_s_as_recomputed_from_weights(family, act):
    model = tiny.tiny_model(family, act=act)
    name = activation_name(model)
    assert name == (act or name) and name in ACTS, name
    sigma = ACTS[name]
    sites = ffn_sites(model)
    layers = _get(model, INPUTS[family][0])
    _, first, up = INPUTS[family]
    ids = _ids()
    with torch.no_grad():
        got = _run(model, sites, need_s=True, ids=ids)
        plain = _run(model, sites, need_s=False, ids=ids)
    assert sorted(got) == list(range(len(sites)))
    for i, layer in enumerate(layers):
        x, h, s = got[i]
        pre = _linear(_get(layer, first), x)
        if up == "fused":
            pre, up_x = pre.chunk(2, dim=-1)
        elif up is not None:
            up_x = _linear(_get(layer, up), x)
        s_ref = sigma(pre)
        h_ref = s_ref * up_x if up is not None else s_ref
        assert h.shape[-1] == tiny.D_FF and h.numel() == ids.numel() * tiny.D_FF  # OPT flattens (B*T, d_ff)
        h, s, x = h.reshape(ids.shape + (-1,)), s.reshape(ids.shape + (-1,)), x.reshape(ids.shape + (-1,))
        pre, h_ref, s_ref = (t.reshape(ids.shape + (-1,)) for t in (pre, h_ref, s_ref))
        assert torch.allclose(h, h_ref, rtol=1e-4, atol=1e-5), (h - h_ref).abs().max()
        assert torch.allclose(s, s_ref, rtol=1e-4, atol=1e-5), (s - s_ref).abs().max()
        # without need_s, s is h itself
        _, h2, s2 = plain[i]
        assert torch.equal(h2.reshape_as(h), h) and torch.equal(s2, h2)


@pytest.mark.parametrize("family", FAMILIES)
def test_column_norms_are_neuron_output_norms_over_abs_h(family):
    model = tiny.tiny_model(family)
    sites = ffn_sites(model)
    with torch.no_grad():
        got = _run(model, sites, need_s=False, ids=_ids(1, 3))
        for site in sites:
            h = got[site.index][1].reshape(-1, tiny.D_FF)[-1]  # the last token's h, shape (d_ff,)
            one_hot = torch.diag(h)  # row i = h_i e_i
            n = site.down(one_hot) - site.down(torch.zeros_like(h))  # row i = n_i = h_i W[:, i]
            assert n.shape == (tiny.D_FF, tiny.HIDDEN)
            ok = h.abs() > 1e-3
            brute = n.norm(dim=1)[ok] / h.abs()[ok]
            norms = site.column_norms()
            assert norms.dtype == torch.float32 and norms.shape == (tiny.D_FF,)
            assert torch.allclose(norms[ok], brute, rtol=1e-4, atol=1e-6)
            w = site.down_weight()
            assert w.shape == (tiny.HIDDEN, tiny.D_FF)
            assert torch.allclose(w @ h, n.sum(0), rtol=1e-4, atol=1e-5)


def test_column_norms_in_fp32_for_bf16_weights():
    model = tiny.tiny_model("llama").to(torch.bfloat16)
    site = ffn_sites(model)[0]
    norms = site.column_norms()
    assert norms.dtype == torch.float32
    assert torch.allclose(norms, site.down.weight.float().norm(dim=0))


@pytest.mark.parametrize("family", FAMILIES)
def test_masking_h_equals_zeroing_down_columns(family):
    model = tiny.tiny_model(family)
    edited = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    masks = [torch.rand(tiny.D_FF, generator=g) < 0.5 for _ in range(tiny.LAYERS)]
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
        with hooked(ffn_sites(model), lambda i, h, s: h * masks[i]):
            masked = model(ids).logits
        for site, m in zip(ffn_sites(edited), masks, strict=True):
            w = site.down.weight
            if type(site.down).__name__ == "Conv1D":
                w[~m, :] = 0
            else:
                w[:, ~m] = 0
        reference = edited(ids).logits
    assert not torch.allclose(masked, dense, atol=1e-3)
    assert torch.allclose(masked, reference, rtol=1e-5, atol=1e-5), (masked - reference).abs().max()


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_hooks_removed_after_block_even_on_error(family):
    model = tiny.tiny_model(family)
    sites = ffn_sites(model)
    ids = _ids()
    before = _hook_count(model)
    with torch.no_grad():
        dense = model(ids).logits
        calls = []
        with hooked(sites, lambda i, h, s: calls.append(i) or torch.zeros_like(h), need_s=True):
            assert _hook_count(model) > before
            zeroed = model(ids).logits
        assert calls == list(range(len(sites)))
        assert not torch.allclose(zeroed, dense)
        assert _hook_count(model) == before
        assert torch.equal(model(ids).logits, dense)
        assert calls == list(range(len(sites)))  # the fn is no longer called
        with pytest.raises(RuntimeError, match="boom"), hooked(sites, lambda i, h, s: None, need_s=True):
            raise RuntimeError("boom")
        assert _hook_count(model) == before
        assert torch.equal(model(ids).logits, dense)


def test_returning_none_leaves_the_output_unchanged():
    model = tiny.tiny_model("qwen3")
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
        with hooked(ffn_sites(model), lambda i, h, s: None, need_s=True):
            assert torch.equal(model(ids).logits, dense)


def test_unknown_model_type_lists_supported_families():
    model = nn.Module()
    model.config = SimpleNamespace(model_type="mamba")
    with pytest.raises(UserError) as e:
        ffn_sites(model)
    msg = str(e.value)
    assert "'mamba'" in msg and "register" in msg
    assert all(f in msg for f in ADAPTERS)


def test_adapter_that_does_not_match_the_model_is_a_user_error(monkeypatch):
    monkeypatch.setitem(ADAPTERS, "llama", Adapter("model.layers", "mlp.nope", "mlp.down_proj", gated=True))
    with pytest.raises(UserError, match="llama"):
        ffn_sites(tiny.tiny_model("llama"))


def test_register_teaches_a_new_family(monkeypatch):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.act, self.out = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)

        def forward(self, x):
            return self.out(self.act(self.up(x)))

    model = nn.Module()
    model.blocks = nn.ModuleList([Block(), Block()])
    model.config = SimpleNamespace(model_type="toy", hidden_act="relu")
    monkeypatch.setattr("sparsinglaw.sites.ADAPTERS", dict(ADAPTERS))
    with pytest.raises(UserError, match="toy"):
        ffn_sites(model)
    register("toy", Adapter("blocks", "act", "out", gated=False))
    sites = ffn_sites(model)
    assert [s.index for s in sites] == [0, 1] and sites[1].down is model.blocks[1].out
    assert sites[0].d_ff == 8 and activation_name(model) == "relu"
    seen = []
    with hooked(sites, lambda i, h, s: seen.append((i, h.shape))):
        model.blocks[0](torch.ones(3, 4))
    assert seen == [(0, (3, 8))]


def test_activation_name_reads_the_config():
    assert activation_name(tiny.tiny_model("llama")) == "silu"
    assert activation_name(tiny.tiny_model("gemma2", act="relu")) == "relu"
    assert activation_name(tiny.tiny_model("gpt2")) == "gelu_new"
    assert activation_name(tiny.tiny_model("opt")) == "relu"
    assert activation_name(tiny.tiny_model("gemma3")) == "gelu_pytorch_tanh"
    assert activation_name(nn.Linear(2, 2)) == "unknown"
