"""The µP Transformer the paper trains (MiniCPM style), written nanoGPT-style for speed.

Llama blocks (RMSNorm, RoPE, fused causal attention, gated FFN with any activation, no biases) plus the
The paper's µP details: embedding output × scale_emb, each residual branch × scale_depth/√L, logits
÷ (d_model/dim_model_base), tied embeddings, init std 0.1 (hidden matrices ÷ √(d_model/dim_model_base)),
and hidden-matrix learning rates ÷ (d_model/dim_model_base) (see `param_groups`).

Projections are fused for speed (q|k|v in one matrix, gate|up in one); `export.py` splits them and folds
every µP scale into the weights so a checkpoint is a plain `LlamaForCausalLM`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsinglaw.errors import UserError

# Activation name (transformers' ACT2FN spelling, so exported configs load as is) -> function.
ACTIVATIONS = {
    "relu": F.relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu2": lambda x: torch.square(F.relu(x)),
}
ACT_ALIASES = {"relu²": "relu2", "relu^2": "relu2", "swish": "silu", "gelu_tanh": "gelu_pytorch_tanh"}


def padded_vocab(vocab_size: int, multiple: int = 64) -> int:
    """Vocabulary rounded up for the LM head: an odd row count (e.g. 122,753) makes the logits rows
    misaligned, and the matmuls and the cross-entropy kernels slower. The extra tokens never occur."""
    return multiple * math.ceil(vocab_size / multiple)


def canonical_act(name: str) -> str:
    """The ACT2FN name of an activation, or UserError listing the supported ones."""
    key = ACT_ALIASES.get(name.lower(), name.lower())
    if key not in ACTIVATIONS:
        raise UserError(f"unknown activation '{name}'; choose one of {', '.join(ACTIVATIONS)}")
    return key


@dataclass
class ModelConfig:
    """Shape and µP constants of one model. d_ff defaults to 2.5·d_model (rounded to a multiple of 8)."""

    vocab_size: int
    d_model: int = 768
    n_layers: int = 16
    head_dim: int = 128
    act: str = "relu"
    d_ff: int = 0
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    scale_emb: float = 12.0
    scale_depth: float = 1.4
    dim_model_base: int = 256
    init_std: float = 0.1
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        self.act = canonical_act(self.act)
        if self.d_model < 1 or self.n_layers < 1 or self.head_dim < 1 or self.vocab_size < 2:
            raise UserError("d_model, n_layers, head_dim must be positive and vocab_size at least 2")
        if self.d_model % self.head_dim:
            raise UserError(f"d_model {self.d_model} is not divisible by the head size {self.head_dim}")
        if self.head_dim % 2:
            raise UserError(f"head size {self.head_dim} must be even (RoPE rotates pairs)")
        if not self.d_ff:
            self.d_ff = 8 * max(1, round(2.5 * self.d_model / 8))

    @property
    def n_heads(self) -> int:
        return self.d_model // self.head_dim

    @property
    def width_mult(self) -> float:
        """µP width multiplier m = d_model / dim_model_base: scales init, hidden lr and logits."""
        return self.d_model / self.dim_model_base

    @property
    def residual_scale(self) -> float:
        return self.scale_depth / math.sqrt(self.n_layers)

    def non_embedding_params(self) -> int:
        """L·(4·d² + 3·d·d_f), as in the paper's size table (norm weights not counted)."""
        return self.n_layers * (4 * self.d_model ** 2 + 3 * self.d_model * self.d_ff)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·N_non-emb + 6·L·d·S (attention) + 6·d·V (LM head)."""
        return (6 * self.non_embedding_params() + 6 * self.n_layers * self.d_model * seq_len
                + 6 * self.d_model * self.vocab_size)

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 like Llama's, so exported models give the same numbers."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cache(head_dim: int, seq_len: int, theta: float, device: torch.device | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq_len, head_dim) in Llama's half-split layout, computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float()
                                / head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps)
        self.gate_up = nn.Linear(d, 2 * cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, d, bias=False)
        self.act = ACTIVATIONS[cfg.act]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.cfg.n_heads
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, h, self.cfg.head_dim).transpose(1, 3).unbind(2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = self.o_proj(y.transpose(1, 2).reshape(b, t, d))
        x = x + y * self.cfg.residual_scale
        gate, up = self.gate_up(self.ffn_norm(x)).chunk(2, dim=-1)
        y = self.down_proj(self.act(gate) * up)
        return x + y * self.cfg.residual_scale


class MuPTransformer(nn.Module):
    """Decoder-only LM; forward returns logits, or the mean cross-entropy when targets are given."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        cos, sin = rope_cache(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """µP init: embedding N(0, init_std²); hidden matrices N(0, (init_std/√m)²); norms 1."""
        std = self.cfg.init_std
        nn.init.normal_(self.embed.weight, std=std)
        for name, p in self.blocks.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=std / math.sqrt(self.cfg.width_mult))
            elif name.endswith("norm.weight"):
                nn.init.ones_(p)
        nn.init.ones_(self.norm.weight)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.cfg.max_seq_len:
            raise UserError(f"sequence length {t} exceeds the model's max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.embed(idx) * self.cfg.scale_emb
        for block in self.blocks:
            x = block(x, cos, sin)
        x = self.norm(x) / self.cfg.width_mult
        logits = F.linear(x, self.embed.weight)  # tied embeddings
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """µP learning rates: hidden matrices lr/m; embedding and norm gains lr. Weight decay on all
        matrices (the embedding included), none on norm gains."""
        hidden = [p for p in self.blocks.parameters() if p.dim() == 2]
        gains = [p for n, p in self.named_parameters() if p.dim() == 1]
        m = self.cfg.width_mult
        return [
            {"params": hidden, "lr": lr / m, "lr_scale": 1 / m, "weight_decay": weight_decay,
             "name": "hidden"},
            {"params": [self.embed.weight], "lr": lr, "lr_scale": 1.0, "weight_decay": weight_decay,
             "name": "embedding"},
            {"params": gains, "lr": lr, "lr_scale": 1.0, "weight_decay": 0.0, "name": "norms"},
        ]
