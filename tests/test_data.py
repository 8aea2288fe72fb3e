"""Text sources -> documents -> packed evaluation batches, and every bad input as a UserError."""

from __future__ import annotations

import json

import pytest
import torch

from sparsinglaw.data import eval_batches, read_documents
from sparsinglaw.errors import UserError

PROSE = "The quick brown fox jumps over the lazy dog. " * 40


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_text_file_is_one_document(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("héllo\nworld\n", encoding="utf-8")
    assert read_documents(f) == ["héllo\nworld\n"]
    assert read_documents(str(f)) == ["héllo\nworld\n"]


def test_folder_reads_text_files_recursively_in_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.md").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    _jsonl(tmp_path / "sub" / "c.jsonl", [{"text": "third"}, {"text": "fourth"}])
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "notes.csv").write_text("not,read")
    assert read_documents(tmp_path) == ["first", "second", "third", "fourth"]


def test_folder_without_text_files_is_a_user_error(tmp_path):
    (tmp_path / "image.png").write_bytes(b"\x00\x01")
    with pytest.raises(UserError, match="holds no"):
        read_documents(tmp_path)


def test_empty_file_inside_a_folder_is_skipped(tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    (tmp_path / "b.txt").write_text("")
    assert read_documents(tmp_path) == ["some text"]


def test_jsonl_records_with_text(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"text": "one", "id": 1}, {"text": "  "}, {"text": "two"}])
    with f.open("a") as fh:
        fh.write("\n")  # blank lines are skipped
    assert read_documents(f) == ["one", "two"]


@pytest.mark.parametrize("lines", [['{"id": 1}'], ['{"text": 3}'], ['["text"]'],
                                   ['{"text": "ok"}', "{broken"]])
def test_jsonl_without_string_text_is_a_user_error(tmp_path, lines):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"d\.jsonl:\d"):
        read_documents(f)


@pytest.mark.parametrize("name", ["weights.bin", "looks.txt"])
def test_binary_file_is_a_user_error(tmp_path, name):
    f = tmp_path / name
    f.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match="binary"):
        read_documents(f)


def test_non_utf8_file_is_a_user_error(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("café crème".encode("latin-1"))
    with pytest.raises(UserError, match="UTF-8"):
        read_documents(f)


@pytest.mark.parametrize("content", ["", "   \n\n\t"])
def test_empty_file_is_a_user_error(tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_text(content)
    with pytest.raises(UserError, match="no text"):
        read_documents(f)


def test_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_documents(tmp_path / "nope.txt")


def test_none_is_the_builtin_pydoc_prose():
    docs = read_documents(None)
    assert len(docs) > 50 and all(isinstance(d, str) and d.strip() for d in docs)
    assert sum(map(len, docs)) > 100_000


def test_batches_shapes_and_total_tokens(tiny_tokenizer):
    batches = eval_batches(tiny_tokenizer, None, tokens=1000, seq_len=64, batch_size=4)
    assert [tuple(b.shape) for b in batches] == [(4, 64)] * 3 + [(3, 64)]  # 15 whole sequences
    assert sum(b.numel() for b in batches) == 960
    assert all(b.dtype == torch.long for b in batches)
    flat = torch.cat(batches)
    assert 0 <= flat.min().item() and flat.max().item() < len(tiny_tokenizer)


def test_fewer_tokens_than_one_sequence_give_one_sequence(tiny_tokenizer):
    (b,) = eval_batches(tiny_tokenizer, None, tokens=10, seq_len=32, batch_size=8)
    assert b.shape == (1, 32)


def test_documents_are_joined_by_eos_in_order(tiny_tokenizer, tmp_path):
    docs = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota kappa"] * 4
    f = _jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    eos = tiny_tokenizer.eos_token_id
    expected = [t for d in docs for t in tiny_tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]]
    seq_len = 8
    batches = eval_batches(tiny_tokenizer, f, tokens=len(expected), seq_len=seq_len, batch_size=2)
    flat = torch.cat(batches).flatten().tolist()
    assert flat == expected[: len(expected) // seq_len * seq_len]
    assert flat.count(eos) >= len(docs) - 1
    assert eos not in tiny_tokenizer(" ".join(docs), add_special_tokens=False)["input_ids"]


def test_short_text_gives_fewer_sequences_than_asked(tiny_tokenizer, tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"text": PROSE}, {"text": PROSE}])
    n = len(tiny_tokenizer(PROSE, add_special_tokens=False)["input_ids"]) + 1
    batches = eval_batches(tiny_tokenizer, f, tokens=4 * n, seq_len=n // 2, batch_size=64)
    assert sum(b.shape[0] for b in batches) == (2 * n) // (n // 2)  # all the text there is


def test_too_short_text_is_a_user_error(tiny_tokenizer, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("hi there")
    with pytest.raises(UserError, match="too short"):
        eval_batches(tiny_tokenizer, f, tokens=1000, seq_len=256, batch_size=2)


@pytest.mark.parametrize("kw", [dict(seq_len=1), dict(batch_size=0), dict(tokens=0)])
def test_bad_sizes_are_user_errors(tiny_tokenizer, kw):
    args = dict(tokens=100, seq_len=16, batch_size=2) | kw
    with pytest.raises(UserError):
        eval_batches(tiny_tokenizer, None, **args)


@pytest.mark.parametrize("ext", [".xz", ".gz", ".bz2"])
def test_compressed_files_read_like_plain_ones(tmp_path, ext):
    import bz2
    import gzip
    import lzma

    pack = {".xz": lzma.compress, ".gz": gzip.compress, ".bz2": bz2.compress}[ext]
    (tmp_path / f"a.txt{ext}").write_bytes(pack(PROSE.encode()))
    records = [{"text": "first document"}, {"text": "second document"}]
    (tmp_path / f"b.jsonl{ext}").write_bytes(pack("".join(json.dumps(r) + "\n" for r in records).encode()))
    assert read_documents(tmp_path / f"a.txt{ext}") == [PROSE]
    assert read_documents(tmp_path / f"b.jsonl{ext}") == ["first document", "second document"]
    assert read_documents(tmp_path) == [PROSE, "first document", "second document"]  # folders see them too
    (tmp_path / f"bad.txt{ext}").write_bytes(b"not compressed at all")
    with pytest.raises(UserError, match="not a valid"):
        read_documents(tmp_path / f"bad.txt{ext}")


def test_corpus_records_each_sources_share(tmp_path):
    from sparsinglaw.data import build_corpus, corpus_documents, dedup

    (tmp_path / "code").mkdir()
    for i in range(12):
        (tmp_path / "code" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 20)
    c = build_corpus(tmp_path / "c", ["prose", tmp_path / "code"], vocab_size=300, val_fraction=0.2,
                     log=lambda _m: None)
    mix = c.meta["sources_mix"]
    assert [m["source"] for m in mix] == ["prose", str((tmp_path / "code").resolve())]
    assert sum(m["train_tokens"] for m in mix) == c.meta["train_tokens"]
    assert sum(m["val_tokens"] for m in mix) == c.meta["val_tokens"]
    assert mix[1]["documents"] == 12 and mix[0]["documents"] == len(dedup(corpus_documents("prose")))
