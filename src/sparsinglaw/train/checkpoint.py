"""Checkpoints of a run: atomic writes, discovery, and the resume point.

Layout of a run folder:

    runs/NAME/config.json                 run settings (model, batch geometry, corpus path)
    runs/NAME/log.jsonl                   one record per logged step / checkpoint
    runs/NAME/paused_state.pt             trainer state of a run stopped for time between checkpoints
    runs/NAME/checkpoints/step-000123/    a plain Hugging Face LlamaForCausalLM folder:
        config.json, generation_config.json, model.safetensors, tokenizer files,
        sparsinglaw.json                  step, tokens, losses, activation, preset
        trainer_state.pt                  model + optimizer + step + RNG (only the newest few keep it)
        DONE                              written last; a folder without it is incomplete

A checkpoint is written into `checkpoints/.tmp-step-...` and renamed into place, so a crash leaves
either a complete checkpoint or a temp folder that is ignored.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

STEP_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.pt"
META_FILE = "sparsinglaw.json"
DONE_FILE = "DONE"
PAUSE_FILE = "paused_state.pt"


@dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint folder and what it records."""

    path: Path
    step: int
    tokens: int
    meta: dict

    @property
    def has_state(self) -> bool:
        return (self.path / STATE_FILE).is_file()


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path, log: Callable[[str], Any] | None = None) -> list[Checkpoint]:
    """Complete checkpoints of a run, oldest first. Incomplete or unreadable ones are skipped (and
    reported through `log` when given)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    out: list[Checkpoint] = []
    for d in sorted(folder.iterdir()):
        m = STEP_RE.match(d.name)
        if not m or not d.is_dir():
            continue
        if not (d / DONE_FILE).is_file():
            if log:
                log(f"skipping checkpoint {d.name}: incomplete (no {DONE_FILE} marker)")
            continue
        try:
            meta = json.loads((d / META_FILE).read_text())
            out.append(Checkpoint(d, int(meta["step"]), int(meta["tokens"]), meta))
        except (OSError, ValueError, KeyError) as e:
            if log:
                log(f"skipping checkpoint {d.name}: unreadable {META_FILE} ({e})")
    return sorted(out, key=lambda c: c.step)


def load_resume_state(run_dir: str | Path, device: torch.device | str = "cpu",
                      log: Callable[[str], Any] = print) -> tuple[Checkpoint, dict] | None:
    """The newest trainer state that loads, with its checkpoint; corrupt ones are skipped with a message.
    A paused state (RUN/paused_state.pt) newer than every checkpoint's state wins; its `Checkpoint` has
    the file as `path` and empty `meta`. None when there is nothing to resume from."""
    found = None
    for ck in reversed(list_checkpoints(run_dir, log)):
        if not ck.has_state:
            continue
        state = _load_state(ck.path / STATE_FILE, device, log)
        if state is not None:
            found = ck, state
            break
    pause = Path(run_dir) / PAUSE_FILE
    if pause.is_file():
        state = _load_state(pause, device, log)
        if state is not None and (found is None or int(state["step"]) > found[0].step):
            return Checkpoint(pause, int(state["step"]), int(state.get("tokens", 0)), {}), state
    return found


def _load_state(path: Path, device: torch.device | str, log: Callable[[str], Any]) -> dict | None:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(state, dict) or "model" not in state or "optimizer" not in state:
            raise ValueError("missing model or optimizer state")
        return state
    except Exception as e:  # noqa: BLE001 - any unreadable state means: try the previous one
        log(f"skipping {path.parent.name}/{path.name}: unreadable trainer state ({str(e).splitlines()[0]})")
        return None


def write_pause_state(run_dir: str | Path, state: dict) -> Path:
    """Save the trainer state of a run stopped between checkpoints, atomically (temp file, rename)."""
    final = Path(run_dir) / PAUSE_FILE
    tmp = final.with_name(f".{PAUSE_FILE}.{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, final)
    return final


def clear_pause_state(run_dir: str | Path) -> None:
    """Drop the paused state once the run has finished (the final checkpoint supersedes it)."""
    (Path(run_dir) / PAUSE_FILE).unlink(missing_ok=True)


def write_checkpoint(run_dir: str | Path, step: int, write: Callable[[Path], None], meta: dict,
                     state: dict | None) -> Path:
    """Write a checkpoint atomically: `write(tmp)` fills the HF files, then the state and metadata,
    then DONE; finally the temp folder is renamed to `step-NNNNNN`."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if state is not None:
            torch.save(state, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / DONE_FILE).write_text("")
        if final.exists():  # re-saving a step after a resume: replace the old copy
            old = folder / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def prune_states(run_dir: str | Path, keep: int) -> None:
    """Drop trainer_state.pt (optimizer etc., ~3× the model) from all but the newest `keep` checkpoints;
    their Hugging Face weights stay for tracking."""
    cks = [c for c in list_checkpoints(run_dir) if c.has_state]
    for c in cks[:max(0, len(cks) - max(1, keep))]:
        (c.path / STATE_FILE).unlink(missing_ok=True)


def clean_temp(run_dir: str | Path) -> None:
    """Remove temp folders left by a crash mid-write."""
    folder = checkpoint_dir(run_dir)
    if folder.is_dir():
        for d in folder.glob(".tmp-step-*"):
            shutil.rmtree(d, ignore_errors=True)
