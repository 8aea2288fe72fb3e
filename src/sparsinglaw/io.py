"""Files: atomic writes (a result file or output folder is either complete or absent, never half-written),
JSONL logs, and the cache folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sparsinglaw.errors import UserError


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: results are as readable as the PNGs beside them


def cache_dir() -> Path:
    """Where built corpora and built-in models are cached: $SPARSINGLAW_CACHE, else ~/.cache/sparsinglaw."""
    env = os.environ.get("SPARSINGLAW_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "sparsinglaw"


def append_jsonl(path: str | os.PathLike, rec: dict) -> None:
    """Append one JSON record as a line (a log: each line is complete or, after a crash, the last is cut)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec, default=_json_default) + "\n")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to a temporary file beside `path`, fsync, then rename over it (mode as open() gives)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, owned: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success move its files into `out`, on failure drop it.

    The staging folder is made on entry, so an unusable `out` (a file, an unwritable place) fails before
    the job's work, with a UserError. `owned`: glob patterns of the files this job writes; those in `out`
    that this run did not write (a previous run's, e.g. thresholds.json of another metric) are removed, so
    the folder never mixes two runs. Other files already in `out` are left alone, and a failed run leaves
    nothing half-written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder for the results")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging.", dir=out.parent))
    except OSError as e:
        raise UserError(f"cannot write results to {out}: {e.strerror or e}; choose another folder") from None
    try:
        yield stage
        out.mkdir(parents=True, exist_ok=True)
        new = {item.name for item in stage.iterdir()}
        for pattern in owned:
            for old in out.glob(pattern):
                if old.name not in new and not old.name.startswith("."):
                    if old.is_dir() and not old.is_symlink():
                        shutil.rmtree(old)
                    else:
                        old.unlink()
        for item in sorted(stage.iterdir()):
            target = out / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
