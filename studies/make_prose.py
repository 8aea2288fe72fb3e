"""Build the English-prose part of the study corpus from Debian packages: a folder of ~32 KB text files.

The GPU machine has no network, so the prose travels with the working tree (git-ignored):
    python studies/make_prose.py studies/data/prose     # apt-get download + dpkg -x; no root needed for those
Sources: GCIDE (Webster 1913 + WordNet), FOLDOC, the Jargon File (dictd databases), fortunes, and the Python 3.11
documentation's reStructuredText sources. Each becomes many documents, so that a corpus split by document keeps
every source on both sides of its validation split.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = ["dict-gcide", "dict-foldoc", "dict-jargon", "fortunes", "python3.11-doc"]
CHUNK = 32_000  # characters per document


def _chunks(text: str, size: int = CHUNK):
    start = 0
    while start < len(text):
        end = text.find("\n\n", start + size)
        end = len(text) if end < 0 else end
        yield text[start:end].strip()
        start = end


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=tmp, check=True, capture_output=True)
        for deb in Path(tmp).glob("*.deb"):
            subprocess.run(["dpkg", "-x", str(deb), f"{tmp}/x"], check=True)
        share = Path(tmp) / "x/usr/share"
        sources = {p.name.split(".")[0]: gzip.open(p, "rt", errors="replace").read()
                   for p in sorted((share / "dictd").glob("*.dict.dz"))}
        sources["fortunes"] = "\n\n".join(p.read_text(errors="replace")
                                          for p in sorted((share / "games/fortunes").glob("*"))
                                          if p.is_file() and not p.suffix)
        sources["pydocs"] = "\n\n".join(p.read_text(errors="replace")
                                        for p in sorted(share.glob("doc/python3.11/html/_sources/**/*.txt")))
    for name, text in sources.items():
        n = 0
        for n, chunk in enumerate(_chunks(text)):
            (out / f"{name}-{n:05d}.txt").write_text(chunk + "\n")
        print(f"{name}: {len(text) / 1e6:.1f} MB in {n + 1} documents")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "data" / "prose"))
