"""What the command line needs around the library: usage errors, interrupts, threads, phases, token counts.

Kept free of torch and transformers at import time, so that `sparsinglaw --help`, usage errors and
`--version` answer in a fraction of a second.
"""

from __future__ import annotations

import difflib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sparsinglaw.errors import UserError

EXIT_USAGE = 2  # bad input: one line, nothing written
EXIT_NOT_REACHED = 3  # the run finished but did not reach what was asked (e.g. an unreachable CETT-PPL target)


# --- choices and token counts ----------------------------------------------------------------------------

def check_choice(option: str, value: str, choices: Iterable[str]) -> str:
    """`value` if it is one of `choices`; else a one-line error naming the closest valid one."""
    choices = list(choices)
    if value in choices:
        return value
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise UserError(f"unknown {option} {value!r}{hint}; use one of {', '.join(choices)}")


def parse_tokens(text: str | int | float, option: str = "--tokens") -> int:
    """'20M' -> 20_000_000: a positive token count with an optional K, M, B (or G) suffix."""
    if isinstance(text, int):
        value = float(text)
    else:
        s = str(text).strip().upper().replace("_", "").replace(",", "")
        mult = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}.get(s[-1:], 1)
        try:
            value = float(s[:-1] if mult > 1 else s) * mult
        except ValueError:
            raise UserError(f"cannot read {option} '{text}' as a token count; use e.g. 8192, 64K, 20M or "
                            "1.5B") from None
    if not value >= 1 or value != value or value == float("inf"):
        raise UserError(f"{option} must be a positive token count (got '{text}')")
    return int(value)


# --- threads ---------------------------------------------------------------------------------------------

def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_threads() -> int:
    """CPU threads that do not oversubscribe: the CPUs this process may use minus those already busy
    (the 1-minute load average), at least 1. OpenMP threads that share a core spin against each other:
    on a loaded 2-core machine, training ran 6-9x slower with the default 2 threads than with 1."""
    cpus = available_cpus()
    try:
        busy = round(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, min(cpus, cpus - busy))


def set_threads(threads: int | None) -> int:
    """Set torch's CPU threads (None: `default_threads()`); returns the number used."""
    n = default_threads() if threads is None else threads
    if n < 1:
        raise UserError(f"--threads must be >= 1 (got {n})")
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(max(1, min(n, 4)))
    except RuntimeError:  # already set, or parallel work already started in this process
        pass
    return n


# --- output folder ----------------------------------------------------------------------------------------

def check_out(out: str | os.PathLike, option: str = "--out") -> Path:
    """Fail before any work when `out` cannot become a results folder (a file, or not writable)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out} is a file; give a folder (it is created if missing)")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{option} {out}: {probe} is a file, so the folder cannot be created; choose another "
                        f"{option}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{option} {out}: {probe} is not writable; choose another {option}")
    return out


# --- interrupts ------------------------------------------------------------------------------------------

class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_kept: Callable[[], str] = lambda: "nothing was written"  # noqa: E731


def on_interrupt(kept: Callable[[], str]) -> None:
    """Say what an interrupt keeps: `kept()` is called after the interrupt and returns one phrase."""
    global _kept
    _kept = kept


def kept_message() -> str:
    try:
        return _kept()
    except Exception as e:  # noqa: BLE001 - the report must not fail
        return f"could not tell what was kept ({type(e).__name__})"


def close_progress_bars() -> None:
    """Close the progress bars left open by an interrupt, so that the report is the last line on stderr."""
    tqdm_mod = sys.modules.get("tqdm")
    if tqdm_mod is None:
        return
    for bar in list(getattr(tqdm_mod.tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the report
            pass


def _raise(signum: int, _frame) -> None:
    raise Interrupted(signum)


def install_signal_handlers() -> dict:
    """SIGINT and SIGTERM raise `Interrupted` in the main thread (the CLI reports and exits 128 + signal).
    Returns the previous handlers, for `restore_signal_handlers`."""
    return {sig: signal.signal(sig, _raise) for sig in (signal.SIGINT, signal.SIGTERM)}


def restore_signal_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


# --- phases: a line before each, its time after ------------------------------------------------------------

class Phases:
    """Times the phases of a command and explains each in one line as it starts (on stderr).

    `with phases("search", "finding tau ..."):` prints the explanation, times the block and records it;
    `phases.seconds` is {phase: seconds}; `phases.closing(...)` is the final line.
    """

    def __init__(self, quiet: bool = False, start: float | None = None):
        self.quiet = quiet
        self.t0 = time.perf_counter() if start is None else start
        self.seconds: dict[str, float] = {}

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    @contextmanager
    def __call__(self, name: str, why: str = "") -> Iterator[None]:
        self.say(f"[{name}] {why}" if why else f"[{name}]")
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def total(self) -> float:
        return time.perf_counter() - self.t0

    def breakdown(self) -> str:
        return ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())

    def closing(self, files: Iterable[str | os.PathLike], extra: str = "") -> str:
        """'done in 12.3 s (imports 1.0 s, ...); <extra>; wrote a, b, c'."""
        names = ", ".join(str(f) for f in files)
        parts = f" ({self.breakdown()})" if self.seconds else ""
        return (f"done in {self.total():.1f} s{parts}" + (f"; {extra}" if extra else "")
                + (f"; wrote {names}" if names else ""))


def process_start() -> float:
    """perf_counter() value at which this process started (imports are counted from here)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        return time.perf_counter() - max(0.0, age)
    except (OSError, ValueError, IndexError):
        return time.perf_counter()
