"""English prose for the GPU studies, from two Debian packages: the GCIDE dictionary (dict-gcide) and the
Python documentation's reST sources (python3-doc). Writes studies/data/*.jsonl.xz (git-ignored: carry the
folder to the GPU machine); one JSON document per dictionary block or documentation page, so the corpus's
document-level train/validation split can use them.

    apt-get install -y dict-gcide python3-doc && python studies/make_prose.py
"""

from __future__ import annotations

import gzip
import json
import lzma
import sys
from pathlib import Path

GCIDE = Path("/usr/share/dictd/gcide.dict.dz")  # dictzip is gzip-compatible
DOCS = Path("/usr/share/doc/python3-doc/html/_sources")
OUT = Path(__file__).resolve().parent / "data"
BLOCK = 8000  # characters per dictionary document (entries are never split)


def _write(name: str, docs: list[str]) -> None:
    path = OUT / name
    with lzma.open(path, "wt", encoding="utf-8", preset=6) as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    chars = sum(map(len, docs))
    print(f"{path}: {len(docs):,} documents, {chars / 1e6:.1f}M characters, {path.stat().st_size / 1e6:.1f} MB")


def main() -> None:
    missing = [str(p) for p in (GCIDE, DOCS) if not p.exists()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}; run: apt-get install -y dict-gcide python3-doc")
    OUT.mkdir(exist_ok=True)
    text = gzip.decompress(GCIDE.read_bytes()).decode("utf-8", errors="replace")
    docs, cur, size = [], [], 0
    for entry in text.split("\n\n"):
        cur.append(entry)
        size += len(entry)
        if size >= BLOCK:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    _write("gcide.jsonl.xz", docs)
    pages = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(DOCS.rglob("*.txt"))]
    _write("python-docs.jsonl.xz", [p for p in pages if p.strip()])


if __name__ == "__main__":
    main()
