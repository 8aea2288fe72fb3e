"""FFN sites: where each decoder layer's activation and down-projection live, and hooks on them.

A family is supported by one declarative line in `ADAPTERS` (like transformers' Auto* registries):
where the layer list is, and, inside a layer, the activation module (its output is s) and the
down-projection (its input is h = s, or s * (W_up x) for gated FFNs). Everything else in the
package talks to `FFNSite` objects and never to model-specific attribute names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from sparsinglaw.errors import UserError


@dataclass(frozen=True)
class Adapter:
    layers: str  # path from the model to the ModuleList of decoder layers
    act: str  # path from a layer to its activation module (output = s)
    down: str  # path from a layer to its down projection (input = h)
    gated: bool


_LLAMA_LIKE = Adapter("model.layers", "mlp.act_fn", "mlp.down_proj", gated=True)
_UP_ACT_DOWN = Adapter("model.layers", "mlp.act_fn", "mlp.down_proj", gated=False)  # down(act(up x)), ReLU²
ADAPTERS: dict[str, Adapter] = {
    **dict.fromkeys(("llama", "mistral", "ministral", "qwen2", "qwen3", "smollm3", "minicpm", "olmo", "olmo2",
                     "olmo3", "granite", "helium", "exaone4", "gemma", "gemma2", "gemma3_text", "vaultgemma",
                     "cohere", "stablelm"), _LLAMA_LIKE),
    **dict.fromkeys(("nemotron", "arcee", "jais2"), _UP_ACT_DOWN),
    "gemma3": Adapter("model.language_model.layers", "mlp.act_fn", "mlp.down_proj", gated=True),
    "phi3": Adapter("model.layers", "mlp.activation_fn", "mlp.down_proj", gated=True),
    "phi": Adapter("model.layers", "mlp.activation_fn", "mlp.fc2", gated=False),
    "nanochat": Adapter("model.layers", "mlp.activation_fn", "mlp.fc2", gated=False),
    "gpt2": Adapter("transformer.h", "mlp.act", "mlp.c_proj", gated=False),
    "gpt_neo": Adapter("transformer.h", "mlp.act", "mlp.c_proj", gated=False),
    "gpt_bigcode": Adapter("transformer.h", "mlp.act", "mlp.c_proj", gated=False),
    "starcoder2": Adapter("model.layers", "mlp.act", "mlp.c_proj", gated=False),
    "gpt_neox": Adapter("gpt_neox.layers", "mlp.act", "mlp.dense_4h_to_h", gated=False),
    "persimmon": Adapter("model.layers", "mlp.act", "mlp.dense_4h_to_h", gated=False),
    "falcon": Adapter("transformer.h", "mlp.act", "mlp.dense_4h_to_h", gated=False),
    "opt": Adapter("model.decoder.layers", "activation_fn", "fc2", gated=False),
    "xglm": Adapter("model.layers", "activation_fn", "fc2", gated=False),
}
_ACT_KEYS = ("hidden_act", "hidden_activation", "activation_function", "activation")  # "activation": Falcon


def register(model_type: str, adapter: Adapter) -> None:
    """Teach the package a new family (`config.model_type`) in one line."""
    ADAPTERS[model_type] = adapter


@dataclass
class FFNSite:
    index: int
    act: nn.Module
    down: nn.Module
    gated: bool

    def down_weight(self) -> torch.Tensor:
        """The down projection as a (d_h, d_f) matrix, whatever the module stores (Linear or GPT-2 Conv1D)."""
        w = self.down.weight
        return w.t() if type(self.down).__name__ == "Conv1D" else w

    @property
    def d_ff(self) -> int:
        return self.down_weight().shape[1]

    def column_norms(self) -> torch.Tensor:
        """‖W_down[:, i]‖₂ for every neuron, in fp32: ‖n_i‖ = |h_i| times this."""
        return self.down_weight().float().norm(dim=0)


def _get(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def activation_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for key in _ACT_KEYS:
        if getattr(cfg, key, None):
            return str(getattr(cfg, key))
    return "unknown"


def ffn_sites(model: nn.Module) -> list[FFNSite]:
    """Every decoder layer's FFN, in order. Unknown families get one line saying how to add one."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    adapter = ADAPTERS.get(mtype)
    if adapter is None:
        raise UserError(f"unsupported architecture {mtype!r}; supported: {', '.join(sorted(ADAPTERS))}. "
                        "Add one with sparsinglaw.sites.register(model_type, "
                        "Adapter(layers, act, down, gated))")
    try:
        layers = _get(model, adapter.layers)
        sites = [FFNSite(i, _get(layer, adapter.act), _get(layer, adapter.down), adapter.gated)
                 for i, layer in enumerate(layers)]
    except AttributeError as e:
        raise UserError(f"model of type {mtype!r} does not have the expected FFN layout ({e}); "
                        "register a matching Adapter in sparsinglaw.sites") from None
    if not sites:
        raise UserError(f"model of type {mtype!r} has no decoder layers")
    return sites


# A site hook sees (site index, h, s) and returns a replacement h (e.g. masked) or None to leave it.
SiteFn = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


@contextlib.contextmanager
def hooked(sites: list[FFNSite], fn: SiteFn, need_s: bool = False) -> Iterator[None]:
    """Call `fn(index, h, s)` at every down projection's input during forward passes in this block.

    s (the activation output) is captured only when `need_s` and the FFN is gated; otherwise s is h.
    h and s have shape (..., d_ff) as the model passes them: (batch, seq, d_ff) for most families, but
    OPT flattens tokens to (batch * seq, d_ff); `h.reshape(-1, d_ff)` lists tokens in (batch, position) order.
    """
    handles = []
    stash: dict[int, torch.Tensor] = {}
    for site in sites:
        if need_s and site.gated:
            def act_hook(_m, _inp, out, i=site.index):
                stash[i] = out
            handles.append(site.act.register_forward_hook(act_hook))

        def down_hook(_m, args, i=site.index):
            h = args[0]
            new = fn(i, h, stash.pop(i, h))
            if new is not None:
                return (new,) + tuple(args[1:])
            return None
        handles.append(site.down.register_forward_pre_hook(down_hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        stash.clear()
