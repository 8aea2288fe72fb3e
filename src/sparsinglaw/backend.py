"""How passes and searches run: one settings object for every kernel, graph and patch switch.

None of these change a result beyond the rounding each kernel documents; they change speed. `Backend` is
resolved once (CLI `--backend`, or the `backend=` argument of `measure` / `tradeoff`), made current for
the duration of the work with `using`, and recorded in every result (`measurement.json`, `tradeoff.json`,
`series.json`, every benchmark JSON). Code deep inside reads `current()`, a module global, never the
environment. Every switch is on by default; each takes effect only where it can serve (Triton importable,
a GPU, or Triton's interpreter for CPU tensors), elsewhere the plain torch path runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace

from sparsinglaw.errors import UserError

_ON, _OFF = ("on", "1", "true", "yes"), ("off", "0", "false", "no")


@dataclass(frozen=True)
class Backend:
    """Performance switches. Field names are the names `--backend` takes."""

    fused_probe: bool = True  # a CETT probe as one Triton kernel (kernels/cett_probe.py)
    probe_updates: bool = True  # a probe near the previous one as a sparse update (kernels/cett_update.py)
    fused_mask: bool = True  # the sparse pass's CETT mask as one Triton kernel (kernels/cett_mask.py)
    fused_rope: bool = True  # Llama-family RoPE through a Triton kernel (kernels/rope.py)
    fused_norm: bool = True  # Llama-family RMSNorm through a Triton kernel (kernels/rmsnorm.py)
    cuda_graphs: bool = True  # CETT passes of a batch shape seen before replay a CUDA graph
    causal_sdpa: bool = True  # Llama-family attention through SDPA's is_causal, no mask (patches.py)
    interpret: bool = False  # kernels serve CPU tensors through Triton's interpreter (tests)

    @classmethod
    def plain(cls) -> Backend:
        """Every switch off: the plain torch path throughout."""
        return cls(**{f.name: False for f in fields(cls)})

    @classmethod
    def parse(cls, text: str, base: Backend | None = None) -> Backend:
        """`base` (default: the current backend) with the switches of `text` applied: comma-separated
        `name=on|off`, or `plain` for every switch off; '' changes nothing."""
        out = base if base is not None else current()
        names = [f.name for f in fields(cls)]
        for item in filter(None, (x.strip() for x in text.split(","))):
            if item == "plain":
                out = replace(cls.plain(), interpret=out.interpret)
                continue
            name, _, value = item.partition("=")
            name, value = name.strip().replace("-", "_"), value.strip().lower()
            if name not in names or value not in _ON + _OFF:
                raise UserError(f"--backend: cannot read {item!r}; use name=on|off with a name among "
                                f"{', '.join(names)}, or 'plain' (every switch off)")
            out = replace(out, **{name: value in _ON})
        return out

    def to_json(self) -> dict:
        return asdict(self)


def _from_startup() -> Backend:
    """The process's default: every switch on; Triton's interpreter as its own variable says (it must be set
    before Triton is imported, so it is read once, here)."""
    return Backend(interpret=os.environ.get("TRITON_INTERPRET", "0") == "1")


_current = _from_startup()


def current() -> Backend:
    """The backend in force."""
    return _current


@contextlib.contextmanager
def using(backend: Backend | None) -> Iterator[Backend]:
    """Make `backend` current inside this block (None: keep the current one); yields the one in force."""
    global _current
    before = _current
    _current = backend if backend is not None else before
    try:
        yield _current
    finally:
        _current = before
