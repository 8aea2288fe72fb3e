"""Shared fixtures: tiny random-weight models of every family, a tiny tokenizer, saved tiny folders.

The builders live in tests/tiny.py (plain functions, `from tiny import tiny_model`); these fixtures wrap them.
"""

from __future__ import annotations

import pytest
import tiny
import torch
from transformers.utils import logging

logging.set_verbosity_error()
# Tiny models are far faster on one thread: intra-op threads only spin on a busy 2-core machine (10x+).
torch.set_num_threads(1)


@pytest.fixture
def tiny_model():
    """Factory: `tiny_model(family, act=None, seed=0)` -> a 2-layer random-weight causal LM (fp32, eval)."""
    return tiny.tiny_model


@pytest.fixture
def tiny_tokenizer():
    """A fresh byte-level BPE PreTrainedTokenizerFast (vocab <= tiny.VOCAB, eos id 0)."""
    return tiny.tiny_tokenizer()


@pytest.fixture
def tiny_dir(tmp_path):
    """Factory: `tiny_dir(family="llama", act=None, seed=0, tokenizer=True)` -> a saved model folder."""
    def make(family: str = "llama", act: str | None = None, seed: int = 0, tokenizer: bool = True):
        return tiny.save_tiny(tmp_path / f"{family}-{act or 'default'}-{seed}", family, act, seed, tokenizer)
    return make
