"""A study plan (TOML) -> validated, independent run specs. Everything here runs before any work.

A plan names its data sources, the tracking settings, defaults shared by every run, and runs: single
`[[runs]]` tables and/or `[[grid]]` tables whose list-valued keys expand to their Cartesian product.
`expand(plan)` is a pure function from the plan to a list of `RunSpec`: each run is independent (its own
folder, seed, corpus reference), so any subset can be given to another process or GPU.

    name = "smoke"
    [data]      sources = ["prose"]; vocab_size = 512
    [tracking]  p = 1.0; tokens = "2K"; seq_len = 64
    [defaults]  tokens_per_param = 200; checkpoints = 24; seq_len = 32; batch_size = 4; lr = 0.02
    [[grid]]    activation = ["relu", "silu"]; shape = [[32, 2], [48, 2]]

Relative data paths are read from the plan file's folder. Errors name the key and the closest valid one.
"""

from __future__ import annotations

import difflib
import glob
import itertools
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sparsinglaw.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TOP_KEYS = ("name", "description", "data", "tracking", "defaults", "runs", "grid")
DATA_KEYS = ("sources", "vocab_size", "val_fraction", "tokenizer")
TRACK_KEYS = ("p", "tokens", "seq_len", "batch_size", "last", "online")
RUN_KEYS = ("name", "preset", "d_model", "n_layers", "head_dim", "shape", "activation", "tokens",
            "tokens_per_param", "checkpoints", "first_checkpoint", "seed", "seq_len", "batch_size",
            "grad_accum", "lr", "family")
GRID_LISTS = ("preset", "shape", "activation", "seed", "tokens", "tokens_per_param", "lr")
FAMILIES = ("width-depth",)
DEFAULT_CHECKPOINTS = 24


@dataclass(frozen=True)
class RunSpec:
    """One training run of a study: everything `TrainConfig` needs, resolved (no preset left to look up
    except as the source of defaults the trainer applies itself)."""

    name: str
    preset: str
    d_model: int
    n_layers: int
    head_dim: int
    activation: str
    tokens: int
    checkpoints: int
    first_checkpoint: float
    seed: int
    seq_len: int
    batch_size: int
    grad_accum: int
    lr: float
    family: str | None = None

    @property
    def non_embedding_params(self) -> int:
        """L·(4d² + 3·d·d_ff), d_ff = 2.5·d rounded as the model does (attention plus gated FFN)."""
        from sparsinglaw.train.model import ModelConfig

        return ModelConfig(vocab_size=256, d_model=self.d_model, n_layers=self.n_layers,
                           head_dim=self.head_dim, act=self.activation).non_embedding_params()

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def to_dict(self) -> dict:
        return {**asdict(self), "non_embedding_params": self.non_embedding_params}


@dataclass(frozen=True)
class Plan:
    """A validated plan: its source text, data and tracking settings, and the expanded runs."""

    name: str
    description: str
    path: Path
    text: str
    sources: list[str]  # resolved: absolute paths or NAMED_SOURCES names
    source_args: list[str]  # as written in the plan (relative to it): what identifies the data anywhere
    vocab_size: int | None
    val_fraction: float
    tokenizer: str | None
    tracking: dict
    runs: list[RunSpec] = field(default_factory=list)

    def data_settings(self) -> dict:
        """The data as the plan states it (machine-independent: a study folder can move between machines)."""
        return {"sources": self.source_args, "vocab_size": self.vocab_size, "val_fraction": self.val_fraction,
                "tokenizer": self.tokenizer}

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "plan_file": str(self.path),
                "data": self.data_settings(), "resolved_sources": self.sources, "tracking": self.tracking,
                "runs": [r.to_dict() for r in self.runs]}


def _check_keys(table: Any, valid: tuple[str, ...], where: str) -> dict:
    if not isinstance(table, dict):
        raise UserError(f"{where} must be a table (key = value lines), not {type(table).__name__}")
    for key in table:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
            raise UserError(f"unknown key '{key}' in {where}; {hint}")
    return table


def _number(value: Any, where: str, kind: type = int, positive: bool = True) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and kind is int:
        ok = float(value).is_integer()
    if not ok or (positive and value <= 0):
        want = "a positive integer" if kind is int else "a positive number"
        raise UserError(f"{where} must be {want}, got {value!r}")
    return kind(value)


def _tokens(value: Any, where: str) -> int:
    from sparsinglaw.train import parse_tokens

    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{where} must be a token count like \"200M\" or 5000000, got {value!r}")
    try:
        return parse_tokens(value if isinstance(value, str) else int(value))
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _sources(values: Any, base: Path) -> list[str]:
    """Resolve data sources: names of NAMED_SOURCES, globs (must match), paths (must exist)."""
    from sparsinglaw.data import NAMED_SOURCES

    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise UserError("[data] sources must be a list of paths, globs or names "
                        f"({', '.join(NAMED_SOURCES)})")
    out: list[str] = []
    for v in values:
        if v in NAMED_SOURCES:
            out.append(v)
            continue
        pattern = Path(v).expanduser()
        pattern = pattern if pattern.is_absolute() else base / pattern
        if any(ch in v for ch in "*?["):
            hits = sorted(glob.glob(str(pattern), recursive=True))
            if not hits:
                raise UserError(f"data source '{v}' matches no file (looked in {base})")
            out += [str(Path(h).resolve()) for h in hits]
        elif pattern.exists():
            out.append(str(pattern.resolve()))
        else:
            raise UserError(f"data source '{v}' does not exist (relative paths are read from the plan's "
                            f"folder {base}); give a path, a glob, or one of {', '.join(NAMED_SOURCES)}")
    return out


def _tracking(table: dict) -> dict:
    t = _check_keys(table, TRACK_KEYS, "[tracking]")
    from sparsinglaw.search import check_p

    p = _number(t.get("p", 1.0), "[tracking] p", float)
    check_p(p)
    out = {"p": p, "tokens": _tokens(t.get("tokens", 65536), "[tracking] tokens"),
           "seq_len": None, "batch_size": None, "last": _number(t.get("last", 5), "[tracking] last"),
           "online": bool(t.get("online", True))}
    for key in ("seq_len", "batch_size"):
        if key in t:
            out[key] = _number(t[key], f"[tracking] {key}")
    return out


def _grid_rows(grid: dict, where: str) -> list[dict]:
    """The Cartesian product of a grid table's list-valued keys (a `shape` list is a list of shapes)."""
    fixed = {k: v for k, v in grid.items() if not (k in GRID_LISTS and _is_axis(k, v))}
    axes = [(k, v) for k, v in grid.items() if k in GRID_LISTS and _is_axis(k, v)]
    for k, v in grid.items():
        if isinstance(v, list) and k not in GRID_LISTS and k != "shape":
            raise UserError(f"{where} key '{k}' cannot be a list; grid axes are {', '.join(GRID_LISTS)}")
    if any(not v for _, v in axes):
        raise UserError(f"{where} has an empty list; give at least one value per axis")
    return [{**fixed, **dict(zip([k for k, _ in axes], combo))}
            for combo in itertools.product(*[v for _, v in axes])]


def _is_axis(key: str, value: Any) -> bool:
    if key == "shape":  # [d, L] is one shape; [[d, L], ...] is an axis
        return isinstance(value, list) and bool(value) and isinstance(value[0], list)
    return isinstance(value, list)


def _run(row: dict, defaults: dict, where: str) -> RunSpec:
    from sparsinglaw.train.model import canonical_act
    from sparsinglaw.train.presets import get_preset

    r = {**defaults, **row}
    preset_name = str(r.get("preset", "tiny"))
    preset = get_preset(preset_name)
    d = _number(r.get("d_model", preset.d_model), f"{where} d_model")
    n = _number(r.get("n_layers", preset.n_layers), f"{where} n_layers")
    h = _number(r.get("head_dim", preset.head_dim), f"{where} head_dim")
    if "shape" in r:  # the most specific: a grid's shape beats d_model / n_layers / head_dim keys
        shape = r["shape"]
        if not isinstance(shape, list) or len(shape) not in (2, 3):
            raise UserError(f"{where} shape must be [d_model, n_layers] or [d_model, n_layers, head_dim], "
                            f"got {shape!r}")
        d, n = _number(shape[0], f"{where} shape d_model"), _number(shape[1], f"{where} shape n_layers")
        h = _number(shape[2], f"{where} shape head_dim") if len(shape) == 3 else h
    if d % h:
        raise UserError(f"{where} d_model {d} is not a multiple of head_dim {h}; set head_dim")
    act = canonical_act(str(r.get("activation", "relu")))
    seq_len = _number(r.get("seq_len", preset.seq_len), f"{where} seq_len")
    batch = _number(r.get("batch_size", preset.batch_size), f"{where} batch_size")
    accum = _number(r.get("grad_accum", preset.grad_accum), f"{where} grad_accum")
    family = r.get("family")
    if family is not None and family not in FAMILIES:
        raise UserError(f"{where} family '{family}' is unknown; use one of {', '.join(FAMILIES)}")
    spec = dict(name="", preset=preset_name, d_model=d, n_layers=n, head_dim=h, activation=act,
                tokens=0, checkpoints=_number(r.get("checkpoints", DEFAULT_CHECKPOINTS), f"{where} checkpoints"),
                first_checkpoint=_number(r.get("first_checkpoint", 0.01), f"{where} first_checkpoint", float),
                seed=_number(r.get("seed", 0), f"{where} seed", positive=False), seq_len=seq_len,
                batch_size=batch, grad_accum=accum, lr=_number(r.get("lr", preset.lr), f"{where} lr", float),
                family=family)
    if spec["first_checkpoint"] > 1:
        raise UserError(f"{where} first_checkpoint must be a fraction of the run's tokens in (0, 1]")
    probe = RunSpec(**spec)
    if "tokens" in row and "tokens_per_param" in row:
        raise UserError(f"{where} gives both tokens and tokens_per_param; keep one")
    if "tokens" in row or ("tokens" in r and "tokens_per_param" not in row):
        tokens = _tokens(r["tokens"], f"{where} tokens")
    elif "tokens_per_param" in r:
        tokens = int(_number(r["tokens_per_param"], f"{where} tokens_per_param", float)
                     * probe.non_embedding_params)
    else:
        raise UserError(f"{where} sets no training length; give tokens = \"20M\" or tokens_per_param = 200")
    if tokens < probe.tokens_per_step:
        raise UserError(f"{where} trains {tokens:,} tokens, fewer than one step ({probe.tokens_per_step:,} = "
                        "batch_size x seq_len x grad_accum); train longer or use a smaller batch")
    spec["tokens"] = tokens
    spec["name"] = str(row.get("name") or _default_name(spec, row))
    return RunSpec(**spec)


def _default_name(spec: dict, row: dict) -> str:
    shape = (f"{spec['preset']}" if not {"shape", "d_model", "n_layers"} & row.keys()
             else f"d{spec['d_model']}-l{spec['n_layers']}")
    return f"{spec['activation']}-{shape}" + (f"-s{spec['seed']}" if spec["seed"] else "")


def expand(raw: dict, base: Path = Path(".")) -> tuple[list[str], dict, list[RunSpec]]:
    """(sources, tracking, runs) of a parsed plan: the pure function the runner and any scheduler use."""
    _check_keys(raw, TOP_KEYS, "the plan")
    data = _check_keys(raw.get("data", {}), DATA_KEYS, "[data]")
    sources = _sources(data.get("sources", ["stdlib"]), base)
    tracking = _tracking(raw.get("tracking", {}))
    defaults = _check_keys(raw.get("defaults", {}), RUN_KEYS, "[defaults]")
    if "name" in defaults:
        raise UserError("[defaults] cannot set name; names belong to single runs")
    rows: list[tuple[dict, str]] = []
    for i, run in enumerate(raw.get("runs", [])):
        rows.append((_check_keys(run, RUN_KEYS, f"[[runs]] #{i + 1}"), f"[[runs]] #{i + 1}"))
    for i, grid in enumerate(raw.get("grid", [])):
        where = f"[[grid]] #{i + 1}"
        _check_keys(grid, RUN_KEYS, where)
        if "name" in grid:
            raise UserError(f"{where} cannot set name; grid runs are named from their values")
        rows += [(row, where) for row in _grid_rows(grid, where)]
    if not rows:
        raise UserError("the plan has no runs; add [[runs]] or [[grid]] tables")
    runs = [_run(row, defaults, where) for row, where in rows]
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.name] = seen.get(r.name, 0) + 1
    dup = [n for n, c in seen.items() if c > 1]
    if dup:
        raise UserError(f"duplicate run name(s) {', '.join(dup)}; give each run a distinct name (or seed)")
    for r in runs:
        if r.checkpoints < tracking["last"]:
            raise UserError(f"run {r.name} has {r.checkpoints} checkpoints, fewer than the {tracking['last']} "
                            "that tau is calibrated on; raise checkpoints")
        steps = log_spacing(r)
        if len(steps) < tracking["last"]:
            raise UserError(f"run {r.name} gets {len(steps)} distinct checkpoint(s) in its "
                            f"{r.tokens // r.tokens_per_step} steps, fewer than the {tracking['last']} that tau "
                            "is calibrated on; train longer or use a smaller batch")
    return sources, tracking, runs


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file; any problem is one UserError line, before anything is written."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plan {path} does not exist; give a .toml plan file (see studies/smoke.toml)")
    text = path.read_text(encoding="utf-8")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"plan {path} is not valid TOML: {e}") from None
    sources, tracking, runs = expand(raw, path.resolve().parent)
    data = raw.get("data", {})
    args = data.get("sources", ["stdlib"])
    vocab = _number(data["vocab_size"], "[data] vocab_size") if "vocab_size" in data else None
    val = _number(data.get("val_fraction", 0.01), "[data] val_fraction", float)
    if not val < 1:
        raise UserError("[data] val_fraction must be below 1")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise UserError("the plan's name must be a non-empty string")
    return Plan(name=name, description=str(raw.get("description", "")), path=path.resolve(), text=text,
                sources=sources, source_args=[args] if isinstance(args, str) else list(args),
                vocab_size=vocab, val_fraction=val,
                tokenizer=str(data["tokenizer"]) if "tokenizer" in data else None, tracking=tracking,
                runs=runs)


def select(runs: list[RunSpec], only: list[str] | None = None, shard: str | None = None) -> list[RunSpec]:
    """A subset of the runs: by name, and/or shard 'K/N' (runs K, K+N, ... counting from 1) so N
    processes or GPUs can each take their share of one plan."""
    if only:
        names = {r.name for r in runs}
        for n in only:
            if n not in names:
                close = difflib.get_close_matches(n, sorted(names), n=1)
                raise UserError(f"no run named '{n}' in the plan" + (f"; did you mean '{close[0]}'?" if close
                                                                     else ""))
        runs = [r for r in runs if r.name in only]
    if shard:
        try:
            k, n = (int(x) for x in shard.split("/"))
            if not 1 <= k <= n:
                raise ValueError
        except ValueError:
            raise UserError(f"--shard {shard!r} must be K/N with 1 <= K <= N, e.g. 2/4") from None
        runs = [r for i, r in enumerate(runs) if i % n == k - 1]
    return runs


def log_spacing(spec: RunSpec) -> list[int]:
    """The run's checkpoint steps (log-spaced), as the trainer will write them."""
    from sparsinglaw.train.trainer import checkpoint_steps

    return checkpoint_steps(spec.tokens // spec.tokens_per_step, "log", count=spec.checkpoints,
                            first=spec.first_checkpoint)


def tokens_per_param(spec: RunSpec) -> float:
    return spec.tokens / spec.non_embedding_params if spec.non_embedding_params else math.nan
