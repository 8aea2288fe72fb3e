"""Tiny random-weight causal LMs and a tiny tokenizer, built in milliseconds, for CPU tests.

Plain functions (importable from any test: `from tiny import tiny_model, ...`); conftest.py exposes them
as fixtures too. Every model has 2 layers, hidden size HIDDEN, FFN width D_FF, vocabulary VOCAB, fp32,
eval mode, and the same special-token ids as `tiny_tokenizer()`.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import torch

VOCAB = 384
HIDDEN = 32
D_FF = 64
LAYERS = 2
HEADS = 4
EOS = "<|endoftext|>"

# Defaults every family understands (through the config's own names or its attribute_map).
_BASE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=D_FF, num_hidden_layers=LAYERS,
             num_attention_heads=HEADS, num_key_value_heads=2, head_dim=HIDDEN // HEADS,
             max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0,
             tie_word_embeddings=False)
# Per-family overrides: names the base does not reach (FFN width, projections, attention layouts).
_EXTRA: dict[str, dict] = {
    "gpt2": dict(n_inner=D_FF, n_positions=128),
    "gpt_bigcode": dict(n_inner=D_FF, n_positions=128),
    "gpt_neo": dict(attention_types=[[["global", "local"], LAYERS // 2]], window_size=16),
    "opt": dict(ffn_dim=D_FF, word_embed_proj_dim=HIDDEN),
    "xglm": dict(ffn_dim=D_FF, d_model=HIDDEN),
    "falcon": dict(ffn_hidden_size=D_FF, num_kv_heads=HEADS, head_dim=None),  # head_dim is derived there
    "phi": dict(num_key_value_heads=HEADS),
    "gpt_neox": dict(num_key_value_heads=HEADS),
}
# Where each family keeps the name of its FFN activation (the first one the config has).
_ACT_KEYS = ("hidden_act", "hidden_activation", "activation_function", "activation")


def families() -> list[str]:
    """Every family in sites.ADAPTERS that this transformers can build as a tiny model."""
    from sparsinglaw.sites import ADAPTERS

    return sorted(f for f in ADAPTERS if f in buildable())


@functools.cache
def buildable() -> frozenset[str]:
    from transformers import CONFIG_MAPPING

    return frozenset(CONFIG_MAPPING)


def tiny_config(family: str, act: str | None = None):
    """A 2-layer config of `family` (a transformers model_type); `act` replaces its FFN activation."""
    from transformers import AutoConfig

    if family == "gemma3":  # multimodal: the tiny gemma3_text inside, with a one-layer vision tower
        vision = dict(hidden_size=HIDDEN, intermediate_size=D_FF, num_hidden_layers=1,
                      num_attention_heads=HEADS, image_size=28, patch_size=14)
        return AutoConfig.for_model("gemma3", text_config=tiny_config("gemma3_text", act).to_dict(),
                                    vision_config=vision, mm_tokens_per_image=4, image_token_index=VOCAB - 1,
                                    boi_token_index=VOCAB - 2, eoi_token_index=VOCAB - 3)
    kw = {k: v for k, v in {**_BASE, **_EXTRA.get(family, {})}.items() if v is not None}
    cfg = AutoConfig.for_model(family, **kw)
    if act is not None:
        key = next((k for k in _ACT_KEYS if getattr(cfg, k, None)), None)
        if key is None:
            raise ValueError(f"{family} config has no activation field among {_ACT_KEYS}")
        setattr(cfg, key, act)
    return cfg


def tiny_model(family: str, act: str | None = None, seed: int = 0) -> torch.nn.Module:
    """A random-weight `AutoModelForCausalLM` of `family` (fp32, eval mode), deterministic in `seed`."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, act)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Tiny init scales (std 0.02) leave every activation near 0; widen them so neurons differ visibly.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.shape[-1] > 1 else 1.0))
    return model.eval()


# Triton kernel tests: on a GPU in every dtype; on CPU through Triton's interpreter in fp32 (its bf16 is unreliable)
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_DTYPES = [torch.float32, torch.bfloat16, torch.float16] if torch.cuda.is_available() else [torch.float32]


def needs_kernel(module):
    """A pytest mark: skip unless `module`'s Triton kernel can run here (a GPU, or the interpreter on)."""
    import pytest

    from sparsinglaw.backend import current

    return pytest.mark.skipif(
        module.triton is None or not (torch.cuda.is_available() or current().interpret),
        reason="needs Triton on a GPU, or its interpreter (TRITON_INTERPRET=1 set before triton is imported)")


def passes_switched(family: str, switch: str, device: str = "cpu", off: tuple[str, ...] = ()):
    """A dense and a CETT pass of a tiny `family` model with the `Backend` switch `switch` off, then on (the
    switches in `off` off throughout): {"0": [dense, sparse], "1": [dense, sparse]}."""
    from sparsinglaw.backend import current, using
    from sparsinglaw.sparse import Model, Rule, run_pass

    model = tiny_model(family).to(device)
    m = Model(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    th = torch.full((m.n_layers,), 0.05, device=device)
    base = replace(current(), **dict.fromkeys(off, False))
    runs = {}
    for flag in ("0", "1"):
        with using(replace(base, **{switch: flag == "1"})):
            runs[flag] = [run_pass(m, ids, Rule("dense")), run_pass(m, ids, Rule("cett", thresholds=th))]
    return runs


def _training_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))[:20000]


@functools.cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_training_text()], trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level BPE (VOCAB ids at most, EOS id 0) trained in memory on CPython's pydoc prose.

    Returns a fresh `PreTrainedTokenizerFast` each call (training is cached), so callers may mutate it.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                  eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=None)
    tok.model_max_length = 1 << 30
    return tok


def save_tiny(path: str | Path, family: str = "llama", act: str | None = None, seed: int = 0,
              tokenizer: bool = True) -> Path:
    """Save a tiny model (safetensors + config.json) and, if `tokenizer`, the tiny tokenizer to `path`."""
    path = Path(path)
    tiny_model(family, act, seed).save_pretrained(path)
    if tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return path


def prose_corpus(folder: Path, duplicate: bool = False) -> Path:
    """A small training corpus (BPE 512) built from CPython's pydoc prose, one document per file;
    `duplicate` adds an exact copy of the first document, which the build must drop."""
    from sparsinglaw.data import build_corpus, read_documents

    src = Path(folder) / "text"
    src.mkdir(parents=True, exist_ok=True)
    docs = read_documents(None)
    for i, doc in enumerate(docs):
        (src / f"doc{i:03d}.txt").write_text(doc)
    if duplicate:
        (src / "dup.txt").write_text(docs[0])
    out = Path(folder) / "corpus"
    build_corpus(out, [src], vocab_size=512, val_fraction=0.1, log=lambda _m: None)
    return out
