"""Text sources -> documents -> packed token batches for evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sparsinglaw.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")


def _builtin_prose() -> list[str]:
    """English prose that ships with every CPython: the pydoc topic help texts."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise UserError(f"{path} looks like a binary file; pass a text file (.txt/.md/.rst/.py) or JSONL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for n, line in enumerate(_read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n} is not valid JSON; each line of a .jsonl file must be one object") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise UserError(f"{path}:{n} has no string field 'text'; JSONL records need {{\"text\": ...}}")
        docs.append(rec["text"])
    return docs


def read_documents(source: str | Path | None) -> list[str]:
    """Documents from a file, a folder, a JSONL file, or (None) the prose CPython ships."""
    if source is None:
        return _builtin_prose()
    path = Path(source)
    if not path.exists():
        raise UserError(f"data path {path} does not exist; pass a text file, a folder of .txt/.md files, or JSONL")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + (".jsonl",))
        if not files:
            raise UserError(f"folder {path} holds no .txt/.md/.rst/.py/.jsonl files")
        docs = [d for f in files for d in read_documents(f)]
    elif path.suffix.lower() == ".jsonl":
        docs = _read_jsonl(path)
    else:
        docs = [_read_text_file(path)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"{path} holds no text; pass a non-empty text file, folder or JSONL")
    return docs


def eval_batches(tokenizer, source: str | Path | None, tokens: int, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """Pack documents (joined by EOS) into (batch_size, seq_len) batches totalling about `tokens` tokens.

    Only whole sequences are used; the last batch may have fewer rows.
    """
    if seq_len < 2 or batch_size < 1 or tokens < 1:
        raise UserError("--seq-len must be >= 2 and --batch-size, --tokens >= 1")
    n_seq = max(1, tokens // seq_len)
    need = n_seq * seq_len
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in read_documents(source):
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= need:
            break
    n_seq = min(n_seq, len(ids) // seq_len)
    if n_seq == 0:
        raise UserError(f"the text has {len(ids)} tokens, too short for one sequence of --seq-len {seq_len}; "
                        "pass more text or a smaller --seq-len")
    flat = torch.tensor(ids[: n_seq * seq_len], dtype=torch.long).view(n_seq, seq_len)
    return list(flat.split(batch_size))
