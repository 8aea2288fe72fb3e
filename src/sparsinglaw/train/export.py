"""Export the µP model as a plain Hugging Face `LlamaForCausalLM` folder.

No custom code is needed to load a checkpoint (`AutoModelForCausalLM.from_pretrained(dir)`, no
trust_remote_code), because every µP scale is folded into the weights exactly:

- embedding × scale_emb        -> embed_tokens = scale_emb · E
- logits ÷ (d_model/base)      -> an untied lm_head = E / m
- residual branch × 1.4/√L     -> o_proj and down_proj multiplied by 1.4/√L

Fused projections are split back (qkv -> q/k/v, gate_up -> gate/up) and `hidden_act` names the
activation in transformers' ACT2FN spelling (relu, silu, gelu, relu2, gelu_pytorch_tanh).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sparsinglaw.train.model import ModelConfig, MuPTransformer


def llama_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        head_dim=cfg.head_dim, hidden_act=cfg.act, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, initializer_range=cfg.init_std,
        bos_token_id=cfg.eos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=None,
        dtype=str(dtype).removeprefix("torch."), architectures=["LlamaForCausalLM"],
    )


@torch.no_grad()
def llama_state_dict(model: MuPTransformer, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = "cpu") -> dict[str, torch.Tensor]:
    """The model's weights renamed to Llama's, with the µP scales folded in (computed in fp32), as `dtype`
    on `device` (None: the model's own device, so a GPU model is never copied through host memory).
    Tensors may share storage with the model's parameters: copy them before training changes those."""
    cfg = model.cfg
    d, f, r = cfg.d_model, cfg.d_ff, cfg.residual_scale

    def w(t: torch.Tensor) -> torch.Tensor:  # fold in fp32, or fp64 for an fp64 model (exactness tests)
        return t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32)

    emb = w(model.embed.weight)
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": emb * cfg.scale_emb,
        "lm_head.weight": emb / cfg.width_mult,
        "model.norm.weight": w(model.norm.weight),
    }
    for i, blk in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = w(blk.qkv.weight).split(d, dim=0)
        gate, up = w(blk.gate_up.weight).split(f, dim=0)
        out.update({
            p + "input_layernorm.weight": w(blk.attn_norm.weight),
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": w(blk.o_proj.weight) * r,
            p + "post_attention_layernorm.weight": w(blk.ffn_norm.weight),
            p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": w(blk.down_proj.weight) * r,
        })
    return {k: v.to(dtype).contiguous().to(device if device is not None else v.device) for k, v in out.items()}


def save_hf(model: MuPTransformer, folder: str | Path, tokenizer: Any = None,
            dtype: torch.dtype = torch.float32) -> None:
    """Write config.json, generation_config.json, model.safetensors and the tokenizer files."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = llama_config(model.cfg, dtype)
    config.save_pretrained(folder)
    eos = model.cfg.eos_token_id
    GenerationConfig(bos_token_id=eos, eos_token_id=eos).save_pretrained(folder)
    save_file(llama_state_dict(model, dtype), str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
