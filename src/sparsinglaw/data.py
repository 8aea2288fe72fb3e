"""Text sources -> documents -> token batches (measuring) and packed token shards (training).

Two halves, one module:
- `read_documents` / `eval_batches`: any local text source to documents, then to fixed
  (batch, seq_len) LongTensors. The measuring engine uses these.
- `build_corpus` / `get_corpus` / `Corpus`: documents -> dedup -> document-level train/val split -> BPE
  tokenizer -> tokens written once to flat uint16/uint32 files (`train.bin`, `val.bin`, nanoGPT style)
  that training only slices through `np.memmap`. No data framework in the hot path.

The default training source is what every Python installation ships (pydoc topics plus the standard
library's .py/.rst/.txt/.md files), so everything works offline on any machine. Named sources pick parts
of it (`prose`, `stdlib`) or every installed package's text (`site-packages`); text files may be
compressed (.xz, .gz, .bz2) and are read transparently.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import math
import os
import re
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsinglaw.errors import UserError
from sparsinglaw.io import atomic_write_json, cache_dir

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
COMPRESSED = {".xz": lzma.decompress, ".gz": gzip.decompress, ".bz2": bz2.decompress}
# Sources given by name: CPython's English prose (pydoc topics), its standard library, installed packages.
NAMED_SOURCES = ("prose", "stdlib", "site-packages")
EOS_TOKEN = "<|endoftext|>"
CORPUS_VERSION = 2  # 2: corpus.json records the per-source mix
TOKENIZER_CHARS = 120_000_000  # BPE is trained on at most about this much text (a spread-out sample)
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git", "node_modules"}


def _builtin_prose() -> list[str]:
    """English prose that ships with every CPython: the pydoc topic help texts."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _suffix(path: Path) -> str:
    """The suffix that says what a file holds: 'a.jsonl.xz' -> '.jsonl' (compression looked through)."""
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _read_bytes(path: Path) -> bytes:
    """A file's bytes, decompressed when its name ends in .xz, .gz or .bz2."""
    raw = path.read_bytes()
    unpack = COMPRESSED.get(path.suffix.lower())
    if unpack is None:
        return raw
    try:
        return unpack(raw)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise UserError(f"{path} is not a valid {path.suffix} file ({e}); recompress it or pass it "
                        "uncompressed") from None


def _read_text_file(path: Path) -> str:
    raw = _read_bytes(path)
    if b"\x00" in raw[:8192]:
        raise UserError(f"{path} looks like a binary file; pass a text file (.txt/.md/.rst/.py) or JSONL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                        "convert it to UTF-8") from None


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for n, line in enumerate(_read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n} is not valid JSON; each line of a .jsonl file must be one "
                            "object") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise UserError(f"{path}:{n} has no string field 'text'; JSONL records need {{\"text\": ...}}")
        docs.append(rec["text"])
    return docs


def _read_parquet(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow (pip install pyarrow); "
                        "or convert it to JSONL") from None
    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise UserError(f"{path} has no 'text' column (columns: {', '.join(table.column_names)})")
    return [t for t in table.column("text").to_pylist() if isinstance(t, str)]


def read_documents(source: str | Path | None) -> list[str]:
    """Documents from a file, a folder (recursive), a JSONL or Parquet file with `text`, or (None) the prose
    CPython ships."""
    if source is None:
        return _builtin_prose()
    path = Path(source)
    if not path.exists():
        raise UserError(f"data path {path} does not exist; pass a text file, a folder of .txt/.md files, "
                        "or JSONL")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and _suffix(p) in TEXT_SUFFIXES + (".jsonl",))
        if not files:
            raise UserError(f"folder {path} holds no .txt/.md/.rst/.py/.jsonl files")
        # an empty file among others is skipped; a binary or non-UTF-8 one still stops with its name
        docs = [d for f in files if f.read_bytes().strip() for d in read_documents(f)]
    elif _suffix(path) == ".jsonl":
        docs = _read_jsonl(path)
    elif path.suffix.lower() == ".parquet":
        docs = _read_parquet(path)
    else:
        docs = [_read_text_file(path)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"{path} holds no text; pass a non-empty text file, folder or JSONL")
    return docs


def eval_batches(tokenizer, source: str | Path | list[str] | None, tokens: int, seq_len: int,
                 batch_size: int) -> list[torch.Tensor]:
    """Pack documents (joined by EOS) into (batch_size, seq_len) batches totalling about `tokens` tokens.

    `source` is anything `read_documents` takes, or the documents themselves (read once, checked early).
    Only whole sequences are used; the last batch may have fewer rows.
    """
    if seq_len < 2 or batch_size < 1 or tokens < 1:
        raise UserError("--seq-len must be >= 2 and --batch-size, --tokens >= 1")
    n_seq = max(1, tokens // seq_len)
    need = n_seq * seq_len
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in source if isinstance(source, list) else read_documents(source):
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


def _read_lenient(path: Path) -> list[str]:
    """Documents of one file inside a folder being built into a corpus: binary files are skipped and
    stray non-UTF-8 bytes replaced, so one odd file in a big tree does not stop the build."""
    if _suffix(path) in (".jsonl", ".parquet"):
        return read_documents(path)
    try:
        raw = _read_bytes(path)
    except (OSError, UserError):
        return []
    if b"\x00" in raw[:8192]:
        return []
    text = raw.decode("utf-8", errors="replace")
    return [text] if text.strip() else []


def _walk_text_files(folder: Path, suffixes: tuple[str, ...] = TEXT_SUFFIXES + (".jsonl",)) -> list[Path]:
    """Text files under a folder, recursively, in a stable order (hidden and package dirs skipped)."""
    out: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        out.extend(Path(root) / f for f in sorted(files) if _suffix(Path(f)) in suffixes)
    return out


def site_packages() -> list[Path]:
    """Every folder installed packages live in (site and user site)."""
    import site

    roots = [*site.getsitepackages(), site.getusersitepackages()]
    return sorted({Path(r) for r in roots if Path(r).is_dir()})


def _named_roots(name: str) -> list[Path]:
    return python_sources() if name == "stdlib" else site_packages()


def corpus_documents(source: str | Path) -> list[str]:
    """Documents of one training source: like `read_documents`, but lenient inside folders; a name of
    NAMED_SOURCES reads that part of this Python installation."""
    if str(source) == "prose":
        return _builtin_prose()
    if str(source) in NAMED_SOURCES:
        return [d for root in _named_roots(str(source)) for f in _walk_text_files(root, TEXT_SUFFIXES)
                for d in _read_lenient(f)]
    path = Path(source).expanduser()
    if not path.is_dir():
        return read_documents(path)
    docs = [d for f in _walk_text_files(path) for d in _read_lenient(f)]
    if not docs:
        raise UserError(f"folder {path} holds no .txt/.md/.rst/.py/.jsonl text")
    return docs


def python_sources() -> list[Path]:
    """What this Python installation ships as text: its standard library folder (installed packages
    skipped) and any `share/doc/python3*` folder under sys.prefix."""
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    roots += sorted(Path(sys.prefix, "share", "doc").glob("python3*"))
    return [r for r in roots if r.is_dir()]


def default_documents() -> list[str]:
    """The default training text: pydoc topics plus the standard library's text and source files."""
    docs = _builtin_prose()
    for root in python_sources():
        docs += [d for f in _walk_text_files(root, TEXT_SUFFIXES) for d in _read_lenient(f)]
    return docs


# ----------------------------------------------------------------------------------------------------
# Corpus building (training)


def _normalise(doc: str) -> str:
    return re.sub(r"\s+", " ", doc).strip()


def dedup(docs: Iterable[str]) -> list[str]:
    """Drop exact duplicates after whitespace normalisation, keeping the first occurrence."""
    seen: set[bytes] = set()
    out: list[str] = []
    for d in docs:
        h = _doc_key(d)
        if h not in seen:
            seen.add(h)
            out.append(d)
    return out


def split_documents(docs: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Document-level split decided by a hash of each document's text, so the same document always lands
    on the same side whatever else is in the corpus (after dedup the two sides cannot overlap)."""
    if not 0 < val_fraction < 1:
        raise UserError(f"val fraction must be between 0 and 1, got {val_fraction}")
    train: list[str] = []
    val: list[str] = []
    for d in docs:
        h = int.from_bytes(hashlib.blake2b(f"{seed}:{_normalise(d)}".encode(), digest_size=8).digest())
        (val if h / 2**64 < val_fraction else train).append(d)
    if not val and len(train) > 1:  # tiny corpora: still hold one document out
        val.append(train.pop())
    if not train:
        raise UserError("the corpus is too small to split into train and validation documents")
    return train, val


def tokenizer_sample(docs: Sequence[str], max_chars: int) -> list[str]:
    """Every k-th document, k chosen so the sample holds about `max_chars` characters (all of them when
    the corpus is smaller): BPE merges learnt from a spread-out sample of a few hundred MB are as good as
    from everything, and the trainer's time grows with its input."""
    total = sum(len(d) for d in docs)
    k = max(1, math.ceil(total / max_chars))
    return list(docs[::k])


def train_tokenizer(docs: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style, one special token <|endoftext|>) trained on `docs`,
    wrapped as a transformers fast tokenizer so it saves and loads with the checkpoints."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 260:
        raise UserError(f"vocab size must be at least 260 (256 bytes + specials), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   model_max_length=1 << 30)


def load_tokenizer(name_or_path: str | Path) -> Any:
    """A tokenizer from a local folder (or a hub id already in the local cache)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except Exception as e:  # noqa: BLE001 - any failure here is the user's path
        raise UserError(f"cannot load tokenizer {name_or_path}: {str(e).splitlines()[0]}") from None


def _eos_id(tokenizer: Any) -> int | None:
    for attr in ("eos_token_id", "sep_token_id", "bos_token_id"):
        tid = getattr(tokenizer, attr, None)
        if isinstance(tid, int):
            return tid
    return None


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text without special tokens; fast path through the Rust tokenizer if any."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _write_tokens(tokenizer: Any, docs: Sequence[str], path: Path, dtype: np.dtype,
                  counted: Callable[[str, int], Any] | None = None) -> int:
    """Tokenise documents (EOS after each) and append them to a flat binary file; return the count.
    `counted(doc, n_tokens)` is told each document's token count (the per-source mix)."""
    eos = _eos_id(tokenizer)
    n = 0
    with open(path, "wb") as f:
        for i in range(0, len(docs), 1024):  # one batched (multi-threaded) encode per 1,024 documents
            chunk = docs[i:i + 1024]
            parts = []
            for doc, ids in zip(chunk, _encode(tokenizer, chunk)):
                arr = np.asarray(ids if eos is None else [*ids, eos], dtype=dtype)
                parts.append(arr)
                if counted is not None:
                    counted(doc, len(arr))
            if parts:
                block = np.concatenate(parts)
                f.write(block.tobytes())
                n += len(block)
    return n


def _doc_key(doc: str) -> bytes:
    return hashlib.blake2b(_normalise(doc).encode(), digest_size=16).digest()


def _count(mix: list[dict], origin: dict, doc: str, key: str, n: int) -> None:
    mix[origin[id(doc)]][key] += n


def _source_name(source: str | Path) -> str:
    return str(source) if str(source) in NAMED_SOURCES else str(Path(source).expanduser().resolve())


@dataclass(frozen=True)
class Corpus:
    """A built corpus folder: corpus.json, tokenizer files, train.bin, val.bin, val.jsonl."""

    path: Path
    meta: dict

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def tokens(self, split: str) -> np.memmap:
        """The split's tokens as a read-only flat memmap ('train' or 'val')."""
        return np.memmap(self.path / f"{split}.bin", dtype=self.dtype, mode="r")

    def tokenizer(self) -> Any:
        return load_tokenizer(self.path)

    def val_documents(self) -> list[str]:
        """Validation documents as text (never seen in training): feed to `eval_batches` or `measure`."""
        return read_documents(self.path / "val.jsonl")

    def val_batches(self, seq_len: int, batch_size: int, tokens: int | None = None) -> list[torch.Tensor]:
        """Validation tokens packed into (batch_size, seq_len) LongTensors, straight from val.bin."""
        val = self.tokens("val")
        n_seq = len(val) // seq_len if tokens is None else min(len(val), tokens) // seq_len
        if n_seq == 0:
            raise UserError(f"the validation split has {len(val)} tokens, fewer than one sequence "
                            f"of {seq_len}")
        flat = torch.from_numpy(np.asarray(val[:n_seq * seq_len], dtype=np.int64)).view(n_seq, seq_len)
        return list(flat.split(batch_size))


def open_corpus(path: str | Path) -> Corpus:
    """Open a folder written by `build_corpus`."""
    path = Path(path)
    meta_file = path / "corpus.json"
    if not meta_file.is_file():
        raise UserError(f"{path} is not a built corpus (no corpus.json)")
    return Corpus(path, json.loads(meta_file.read_text()))


def is_corpus(path: str | Path) -> bool:
    return (Path(path) / "corpus.json").is_file()


def build_corpus(out: str | Path, sources: Sequence[str | Path] | None = None, *, vocab_size: int = 8192,
                 tokenizer: str | Path | None = None, val_fraction: float = 0.01, seed: int = 0,
                 min_val_tokens: int = 32768, log: Any = print) -> Corpus:
    """Build a training corpus folder from text sources (None -> what Python ships).

    Steps: read documents, drop exact duplicates, split by document into train/val, train a BPE tokenizer
    on the train split (or load `tokenizer`), tokenise both splits once into flat uint16/uint32 files.
    The validation fraction is raised if needed so val holds at least `min_val_tokens` (estimated).
    Written atomically: the folder is complete or absent.
    """
    out = Path(out)
    if sources:
        names = [_source_name(s) for s in sources]
        per_source = [corpus_documents(s) for s in sources]
    else:
        names = ["python:pydoc_topics", *map(str, python_sources())]
        per_source = [_builtin_prose(), default_documents()[len(_builtin_prose()):]]
        names = [names[0], ", ".join(names[1:])]
    docs = [d for part in per_source for d in part]
    # id of each document object -> its source (dedup and the split keep the objects themselves)
    origin = {id(d): i for i, part in enumerate(per_source) for d in part}
    n_read = len(docs)
    docs = dedup(docs)
    if not docs or sum(len(d) for d in docs) == 0:
        raise UserError("the corpus is empty")
    chars = sum(len(d) for d in docs)
    val_fraction = min(0.5, max(val_fraction, 4.0 * min_val_tokens / chars))  # ~4 characters per token
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    log(f"corpus: {n_read} documents, {n_read - len(docs)} duplicates dropped, "
        f"{len(train_docs)} train / {len(val_docs)} val, {chars / 1e6:.1f}M characters")
    tok = load_tokenizer(tokenizer) if tokenizer else train_tokenizer(
        tokenizer_sample(train_docs, TOKENIZER_CHARS), vocab_size)
    n_vocab = len(tok)
    dtype = np.dtype(np.uint16 if n_vocab <= 65536 else np.uint32)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging.", dir=out.parent))
    try:
        tok.save_pretrained(stage)
        mix = [{"source": n, "documents": 0, "characters": 0, "train_tokens": 0, "val_tokens": 0}
               for n in names]
        for d in docs:
            m = mix[origin[id(d)]]
            m["documents"] += 1
            m["characters"] += len(d)
        n_train = _write_tokens(tok, train_docs, stage / "train.bin", dtype,
                                lambda d, n: _count(mix, origin, d, "train_tokens", n))
        n_val = _write_tokens(tok, val_docs, stage / "val.bin", dtype,
                              lambda d, n: _count(mix, origin, d, "val_tokens", n))
        with open(stage / "val.jsonl", "w", encoding="utf-8") as f:
            for d in val_docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        meta = {"version": CORPUS_VERSION, "sources": names, "documents_read": n_read,
                "documents": len(docs), "train_documents": len(train_docs), "val_documents": len(val_docs),
                "train_tokens": n_train, "val_tokens": n_val, "vocab_size": n_vocab, "dtype": dtype.name,
                "eos_token_id": _eos_id(tok), "tokenizer": str(tokenizer) if tokenizer else "bpe-trained",
                "val_fraction": val_fraction, "seed": seed, "sources_mix": mix}
        atomic_write_json(stage / "corpus.json", meta)
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log(f"corpus: {n_train / 1e6:.2f}M train tokens, {n_val / 1e6:.3f}M val tokens, vocab {n_vocab} -> {out}")
    return open_corpus(out)


def _fingerprint(sources: Sequence[str | Path] | None, settings: dict) -> str:
    """A key that changes when the source files or the corpus settings change."""
    h = hashlib.sha256(json.dumps({"v": CORPUS_VERSION, **settings}, sort_keys=True).encode())
    roots = python_sources()
    h.update(b"default" if not sources else b"user")
    if sources:
        named = [str(s) for s in sources if str(s) in NAMED_SOURCES]
        roots = [Path(s).expanduser().resolve() for s in sources if str(s) not in NAMED_SOURCES]
        for name in named:  # prose changes with the Python version; the others by their files
            h.update(f"{name}\0{sys.version}\n".encode())
            roots += [] if name == "prose" else _named_roots(name)
    for root in roots:
        files = _walk_text_files(root) if root.is_dir() else [root]
        for f in files:
            try:
                st = f.stat()
            except OSError:
                continue
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def get_corpus(sources: Sequence[str | Path] | None = None, *, vocab_size: int = 8192,
               tokenizer: str | Path | None = None, val_fraction: float = 0.01, seed: int = 0,
               log: Any = print) -> Corpus:
    """A corpus for training: a built corpus folder is opened as is; anything else (or None, the
    default Python-shipped text) is built once and cached under `cache_dir()`, keyed by its files."""
    if sources and len(sources) == 1 and is_corpus(sources[0]):
        return open_corpus(sources[0])
    for s in sources or []:
        if str(s) not in NAMED_SOURCES and not Path(s).expanduser().exists():
            raise UserError(f"no such file or folder: {s}")
    settings = {"vocab": vocab_size, "tok": str(tokenizer), "val": val_fraction, "seed": seed}
    path = cache_dir() / "corpora" / _fingerprint(sources, settings)
    if is_corpus(path):
        return open_corpus(path)
    return build_corpus(path, sources, vocab_size=vocab_size, tokenizer=tokenizer,
                        val_fraction=val_fraction, seed=seed, log=log)


def n_sequences(n_tokens: int, seq_len: int) -> int:
    """How many (seq_len + 1)-token training windows a split of n_tokens holds (stride seq_len)."""
    return max(0, (n_tokens - 1) // seq_len)
