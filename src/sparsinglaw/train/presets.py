"""Named model sizes: a CPU toy, a small one-GPU ladder, the paper's sizes and its 0.1B width-depth family.

All keep the paper's proportions (gated FFN d_ff = 2.5·d_model, d_model/L near 48 for the ladders);
small presets use a smaller head size so they still have several heads. Batch sizes of the paper's
presets are the paper's tokens per step at sequence length 4096, split into micro-batches
that fit one H200 (gradient accumulation makes up the rest).
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsinglaw.errors import UserError


@dataclass(frozen=True)
class Preset:
    """Model shape plus default batch geometry (tokens per step = batch_size · seq_len · grad_accum)."""

    d_model: int
    n_layers: int
    head_dim: int
    seq_len: int
    batch_size: int
    grad_accum: int
    vocab_size: int = 32768  # BPE size when the corpus trains its own tokenizer
    lr: float = 0.01
    note: str = ""


# the paper's 0.1B width-depth family (d_model, n_layers)
WIDTH_DEPTH_01B = [(256, 144), (384, 64), (512, 36), (768, 16), (896, 12), (1024, 9), (1152, 7), (1280, 6),
                   (1408, 5), (1536, 4), (1792, 3), (2048, 2)]

PRESETS: dict[str, Preset] = {
    "tiny": Preset(128, 4, 32, seq_len=128, batch_size=8, grad_accum=1, vocab_size=2048,
                   note="CPU toy, 0.8M non-emb"),
    "5m": Preset(256, 6, 64, seq_len=1024, batch_size=32, grad_accum=1, vocab_size=16384,
                 note="one GPU, minutes"),
    "14m": Preset(384, 8, 64, seq_len=1024, batch_size=32, grad_accum=2, vocab_size=16384, note="one GPU"),
    "30m": Preset(512, 10, 64, seq_len=2048, batch_size=16, grad_accum=2, vocab_size=16384, note="one GPU"),
    "57m": Preset(640, 12, 128, seq_len=2048, batch_size=16, grad_accum=4, vocab_size=16384, note="one GPU"),
    "0.1b": Preset(768, 16, 128, seq_len=4096, batch_size=8, grad_accum=10, note="paper, 327,680 tok/step"),
    "0.2b": Preset(1024, 20, 128, seq_len=4096, batch_size=8, grad_accum=18, note="paper, 589,824 tok/step"),
    "0.4b": Preset(1280, 24, 128, seq_len=4096, batch_size=8, grad_accum=24, note="paper, 786,432 tok/step"),
    "0.8b": Preset(1536, 28, 128, seq_len=4096, batch_size=4, grad_accum=72,
                   note="paper, 1,179,648 tok/step"),
    "1.2b": Preset(1792, 32, 128, seq_len=4096, batch_size=4, grad_accum=96,
                   note="paper, 1,572,864 tok/step"),
    "2.4b": Preset(2304, 40, 128, seq_len=4096, batch_size=2, grad_accum=256,
                   note="paper, 2,097,152 tok/step"),
}
for _d, _l in WIDTH_DEPTH_01B:
    PRESETS[f"0.1b-d{_d}-l{_l}"] = Preset(_d, _l, 128, seq_len=4096, batch_size=8, grad_accum=10,
                                          note=f"paper width-depth family, d/L = {_d / _l:.1f}")


def get_preset(name: str) -> Preset:
    key = name.lower()
    if key not in PRESETS:
        raise UserError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    return PRESETS[key]
