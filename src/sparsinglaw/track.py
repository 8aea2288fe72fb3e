"""Sparsity over a training run: the paper's stabilizing strategy (one tau per run), kept up to date.

- `track(run_dir)`: calibrate ONE tau on the last five checkpoints together (the mean of their PPL
  ratios is 1 + p%), then measure EVERY checkpoint at that tau (thresholds re-searched per checkpoint and
  batch) on the run's validation split. Writes RUN/series.json, which `sparsinglaw fit` reads, and plots.
  A second call measures only new checkpoints, unless the recalibrated tau moved (then everything).
- `OnlineTracker`: a cheap measurement of each new checkpoint with its own tau, as the trainer's
  `on_checkpoint` hook; one JSON line per checkpoint in RUN/online.jsonl (an early view, not the curve).
- `SparsityCallback`: the same for people who train with Hugging Face's `Trainer` (measures on every save).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from sparsinglaw.backend import current
from sparsinglaw.errors import UserError
from sparsinglaw.io import append_jsonl, atomic_write_json
from sparsinglaw.search import (
    Evaluation,
    FastSearch,
    PassCounter,
    check_p,
    combine,
    fast_search,
    stream,
)
from sparsinglaw.solver import Acceptance, TauSolver
from sparsinglaw.sparse import Model
from sparsinglaw.uncertainty import Noise, a_per_f, band

SERIES_FILE = "series.json"
ONLINE_FILE = "online.jsonl"
TAU_RTOL = 0.01  # a recalibrated tau within 1% of the stored one keeps the stored curve
DEFAULT_TOKENS = 65536  # validation tokens per checkpoint (capped by the validation split)
CPU_STATE_BUDGET = 2 << 30  # bytes of dense intermediates held across the calibration checkpoints
_SETTINGS = ("p", "tokens", "seq_len", "batch_size", "positions", "dtype")


@dataclass
class TrackResult:
    """What one `track` call did: the series written, and which checkpoints it (re)measured and why."""

    path: Path
    series: dict
    measured: list[str]
    reused: list[str]
    calibrated: bool
    message: str
    plots: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        s = self.series
        cal = (s.get("calibration") or {}).get("band")
        band = f" [{cal['tau_interval'][0]:.5f}, {cal['tau_interval'][1]:.5f}]" if cal else ""
        lines = [self.message,
                 f"tau {s['tau']:.5f}{band} (CETT-PPL-{s['p']:g}%), {len(s['tokens'])} checkpoints, "
                 f"{s['settings']['tokens']} validation tokens each; measured {len(self.measured)}, "
                 f"kept {len(self.reused)} ({self.seconds:.1f} s)",
                 f"{'checkpoint':<14} {'tokens':>12} {'act. ratio':>10} {'95% +-':>7} {'PPL ratio':>9} {'dead':>7}"]
        for i, ck in enumerate(s["checkpoints"]):
            iv = (s.get("activation_ratio_interval") or [None] * (i + 1))[i]
            half = f"{(iv[1] - iv[0]) / 2:>7.4f}" if iv else f"{'':>7}"
            lines.append(f"{ck['name']:<14} {s['tokens'][i]:>12,} {s['activation_ratio'][i]:>10.4f} {half} "
                         f"{s['ppl_ratio'][i]:>9.5f} {s['dead_neuron_ratio'][i]:>7.4f}")
        return "\n".join(lines)


# --- the run: its config, checkpoints and validation batches ------------------------------------------

def run_config(run_dir: str | Path) -> dict:
    """The run's config.json (written by `sparsinglaw train`); a clear error for anything else."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder; give the --out folder of `sparsinglaw train`")
    cfg = run_dir / "config.json"
    if not cfg.is_file() or not (run_dir / "checkpoints").is_dir():
        raise UserError(f"{run_dir} is not a training run (needs config.json and checkpoints/); give the "
                        "--out folder of `sparsinglaw train`")
    try:
        info = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg} is not valid JSON ({e.msg}); was the run folder edited?") from None
    if "corpus" not in info:
        raise UserError(f"{cfg} names no corpus; track a run written by `sparsinglaw train`")
    return info


def val_batches(info: dict, tokens: int | None, seq_len: int | None, batch_size: int | None
                ) -> list[torch.Tensor]:
    """The run's validation split (never trained on) packed into batches; the run's geometry by default."""
    from sparsinglaw.data import open_corpus

    seq_len = seq_len or info.get("seq_len") or 512
    batch_size = batch_size or info.get("batch_size") or 4
    tokens = DEFAULT_TOKENS if tokens is None else tokens
    if tokens < 1 or seq_len < 2 or batch_size < 1:
        raise UserError("--tokens and --batch-size must be >= 1 and --seq-len >= 2")
    path = Path(info["corpus"])
    if not path.is_dir():
        raise UserError(f"the run's corpus {path} is missing; tracking measures on its validation split, "
                        "so rebuild or copy the corpus to that path")
    return open_corpus(path).val_batches(seq_len, batch_size, max(tokens, seq_len))


def _load(ck_path: Path, device: str, dtype: str) -> tuple[torch.nn.Module, str]:
    """A checkpoint in eval mode, without the per-load progress bar (a run has dozens of checkpoints)."""
    from transformers.utils import logging

    from sparsinglaw.models import load_model

    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        lm = load_model(str(ck_path), device=device, dtype=dtype)
    finally:
        if bar:
            logging.enable_progress_bar()
    return lm.model, str(lm.dtype).removeprefix("torch.")


def _intact(ck_path: Path, say: Callable[[str], Any]) -> bool:
    """Whether the checkpoint's weight files are whole (their safetensors headers are read and checked
    against the file sizes, without loading tensors); a truncated or corrupt one is skipped with one line."""
    from safetensors import SafetensorError, safe_open

    files = sorted(ck_path.glob("*.safetensors"))
    if not files:
        say(f"skipping checkpoint {ck_path.name}: no *.safetensors weights in {ck_path}")
        return False
    for f in files:
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            say(f"skipping checkpoint {ck_path.name}: {f.name} is truncated or corrupt ({str(e).splitlines()[0]})")
            return False
    return True


def _free(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()


# --- calibration: one tau for the last checkpoints together ----------------------------------------------

@dataclass
class Calibration:
    tau: float
    checkpoints: list[str]
    ppl_ratio: list[float]  # each checkpoint's PPL ratio (mean over batches) at tau
    mean_ppl_ratio: float
    evaluations: int
    seconds: float
    message: str = ""
    band: dict | None = None  # `uncertainty.Band` of the calibration: the tau band consistent with the target
    a_per_f: float | None = None  # d(activation ratio) / d(PPL ratio) at the target, on the calibration's evaluations

    def to_json(self) -> dict:
        return {"tau": self.tau, "checkpoints": self.checkpoints, "ppl_ratio": self.ppl_ratio,
                "mean_ppl_ratio": self.mean_ppl_ratio, "evaluations": self.evaluations,
                "seconds": self.seconds, "message": self.message, "band": self.band, "a_per_f": self.a_per_f}


def calibrate(models: list[tuple[str, torch.nn.Module]], batches: list[torch.Tensor], p: float,
              positions: str = "all", tau0: float = 0.1, ftol: float = 1e-4, state_budget: int | None = None,
              log: Callable[[str], Any] = print, noise: Noise | None = None) -> Calibration:
    """Find the tau at which the mean over `models` of their PPL ratios is 1 + p/100 (the paper's rule).

    Each model's dense passes and per-layer statistics are kept across the root finder's rounds when they
    fit in `state_budget` bytes (default: half the free GPU memory, or 2 GiB on a CPU); otherwise every
    round streams the batches again (dense pass, search, sparse pass), so memory stays one batch.
    """
    target = check_p(p)
    t0 = time.perf_counter()
    ms = [(name, Model(model)) for name, model in models]
    m0 = ms[0][1]
    elem = next(m0.model.parameters()).element_size()
    need = 2 * sum(b.numel() for b in batches) * sum(m.n_layers * m.d_ff for _, m in ms) * elem
    if state_budget is None:
        state_budget = (torch.cuda.mem_get_info(m0.device)[0] // 2 if m0.device.type == "cuda"
                        else CPU_STATE_BUDGET)
    keep = need <= state_budget
    counter = PassCounter(len(batches) * len(ms))
    states = [FastSearch(m, batches, positions, counter) for _, m in ms] if keep else None
    log(f"calibrating one tau on {', '.join(n for n, _ in ms)} "
        f"({'dense passes held' if keep else 'streamed: dense intermediates exceed the memory budget'})")
    per_tau: dict[float, list[Evaluation]] = {}
    means: list[Evaluation] = []  # each tau's evaluation of the calibration checkpoints together

    def evaluate(tau: float) -> Evaluation:
        evs = []
        for j, (_, m) in enumerate(ms):
            evs.append(states[j].evaluate(tau, detail=False, lockstep=True) if keep
                       else combine(tau, stream(m, batches, tau, positions, counter, detail=False)))
        per_tau[tau] = evs
        mean = sum(e.ppl_ratio for e in evs) / len(evs)
        log(f"  tau={tau:.6f}  mean PPL ratio {mean:.5f}  ("
            + ", ".join(f"{e.ppl_ratio:.4f}" for e in evs) + ")")
        means.append(Evaluation(tau=tau, ppl_ratio=mean, loss_dense=sum(e.loss_dense for e in evs) / len(evs),
                          loss_sparse=sum(e.loss_sparse for e in evs) / len(evs),
                          kept=sum(e.kept for e in evs), tokens=sum(e.tokens for e in evs), d_ff=evs[0].d_ff,
                          thresholds=torch.cat([e.thresholds for e in evs]),
                          batch_ratios=[e.ppl_ratio for e in evs],
                          # every checkpoint's batches: F is the mean of their ratios (as many per checkpoint)
                          blocks=[b for e in evs for b in e.blocks]))
        return means[-1]

    solved = TauSolver(target, Acceptance(ftol=ftol), tau0=tau0).solve(evaluate)
    ev, message = solved.evaluation, "" if solved.success else solved.message
    found = band(means, target, noise)
    if states is not None:
        states.clear()  # free the dense intermediates before the measuring passes
    _free(m0.device)
    if message:
        log(f"  calibration: {message}")
    return Calibration(tau=ev.tau, checkpoints=[n for n, _ in ms], ppl_ratio=list(ev.batch_ratios),
                       mean_ppl_ratio=ev.ppl_ratio, evaluations=len(per_tau),
                       seconds=time.perf_counter() - t0, message=message,
                       band=found.to_json() if found is not None else None, a_per_f=a_per_f(means, target))


# --- one checkpoint at a fixed tau -----------------------------------------------------------------------

def measure_checkpoint(model: torch.nn.Module, batches: list[torch.Tensor], tau: float, ck: Any,
                       positions: str = "all", a_per_f: float | None = None, noise: Noise | None = None) -> dict:
    """Everything the series keeps about one checkpoint at `tau` (per-batch thresholds, streamed).

    Its interval: the noise of its PPL ratio (bootstrap over token blocks) carried to the activation ratio
    through the calibration's slope `a_per_f` (how far the activation ratio moves for the PPL ratio to
    move that much at the target): activation_ratio +- z * sigma_F * |a_per_f|."""
    from sparsinglaw.measure import measure

    t0 = time.perf_counter()
    meas = measure(model, batches, metric="cett", tau=tau, positions=positions, static_check=False,
                   name=ck.path.name, progress=False)
    return {"name": ck.path.name, "step": ck.step, "tokens": ck.tokens, "time": ck.meta.get("time"),
            "val_loss": ck.meta.get("val_loss"), "activation_ratio": meas.activation_ratio,
            "ppl": meas.ppl_sparse, "ppl_dense": meas.ppl_dense, "ppl_ratio": meas.ppl_ratio,
            "layer_ratio": [layer["activation_ratio"] for layer in meas.layers],
            "dead_neuron_ratio": meas.dead_neuron_ratio, "frequency_histogram": meas.frequency_histogram,
            "ppl_ratio_sigma": meas.ppl_ratio_sigma,
            "activation_ratio_sigma": (meas.ppl_ratio_sigma * abs(a_per_f)
                                       if meas.ppl_ratio_sigma is not None and a_per_f is not None else None),
            "activation_ratio_interval": point_interval(meas.activation_ratio, meas.ppl_ratio_sigma, a_per_f, noise),
            "seconds": time.perf_counter() - t0}


def point_interval(activation_ratio: float, ppl_ratio_sigma: float | None, a_per_f: float | None,
                   noise: Noise | None = None) -> list[float] | None:
    """activation_ratio +- z sigma_F |dA/dF| at the noise's level (None where either is unknown)."""
    if ppl_ratio_sigma is None or a_per_f is None:
        return None
    from scipy.stats import norm

    half = float(norm.ppf(0.5 + (noise or Noise()).level / 2)) * ppl_ratio_sigma * abs(a_per_f)
    return [max(0.0, activation_ratio - half), min(1.0, activation_ratio + half)]


_COLUMNS = ("activation_ratio", "ppl", "ppl_dense", "ppl_ratio", "layer_ratio", "dead_neuron_ratio",
            "frequency_histogram", "val_loss", "ppl_ratio_sigma", "activation_ratio_sigma",
            "activation_ratio_interval")


def _series(records: list[dict], meta: dict, tau: float, calibration: dict, settings: dict) -> dict:
    """series.json: metadata, then one list per quantity (one entry per checkpoint, oldest first)."""
    records = sorted(records, key=lambda r: r["step"])
    out = {**meta, "p": settings["p"], "tau": tau, "metric": f"CETT-PPL-{settings['p']:g}%",
           "calibration": calibration, "settings": settings, "backend": current().to_json(),
           "tokens": [r["tokens"] for r in records]}
    for key in _COLUMNS:
        out[key] = [r.get(key) for r in records]
    out["checkpoints"] = [{"name": r["name"], "step": r["step"], "tokens": r["tokens"], "time": r.get("time"),
                           "seconds": r.get("seconds")} for r in records]
    return out


def _records(series: dict) -> list[dict]:
    """The per-checkpoint records of a stored series.json (inverse of `_series`)."""
    out = []
    for i, ck in enumerate(series.get("checkpoints", [])):
        rec = {"name": ck["name"], "step": ck["step"], "tokens": ck["tokens"], "time": ck.get("time"),
               "seconds": ck.get("seconds")}
        for key in _COLUMNS:
            rec[key] = series[key][i] if i < len(series.get(key) or []) else None
        out.append(rec)
    return out


def _read_previous(path: Path, log: Callable[[str], Any]) -> dict | None:
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
        _records(old)
        float(old["tau"])
        return old
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        log(f"ignoring {path}: not a series written by `sparsinglaw track` ({e}); measuring everything")
        return None


def _reusable(old: dict | None, settings: dict, names: dict, say: Callable[[str], Any]) -> tuple[dict, str]:
    """What a stored series still holds: its records of checkpoints that exist unchanged, measured under equal
    settings (name -> record), and why every checkpoint must be measured again ("" where not)."""
    if old is None:
        return {}, "no series yet"
    changed = [k for k in _SETTINGS if old.get("settings", {}).get(k) != settings[k]]
    if changed:
        return {}, "settings changed (" + ", ".join(
            f"{k} {old.get('settings', {}).get(k)} -> {settings[k]}" for k in changed) + ")"
    reusable = {}
    for rec in _records(old):
        ck = names.get(rec["name"])
        if ck is not None and rec.get("time") == ck.meta.get("time") and rec["step"] == ck.step:
            reusable[rec["name"]] = rec
    gone = len(old.get("checkpoints", [])) - len(reusable)
    if gone:
        say(f"dropping {gone} stored record(s) whose checkpoint is gone or was rewritten")
    return reusable, ""


# --- track ----------------------------------------------------------------------------------------------

def track(run_dir: str | Path, p: float = 1.0, tokens: int | None = None, seq_len: int | None = None,
          batch_size: int | None = None, last: int = 5, recalibrate: bool = False, device: str = "auto",
          dtype: str = "auto", out: str | Path | None = None, positions: str = "all", plots: bool = True,
          state_budget: int | None = None, progress: bool = True,
          log: Callable[[str], Any] | None = None) -> TrackResult:
    """Measure a run's checkpoints with one tau calibrated on its last `last` checkpoints, as the paper does.

    Incremental: with a series.json already in `out` (default: the run folder), tau is recalibrated on the
    current last checkpoints; if it moved by more than 1% (or `recalibrate`, or the settings changed),
    every checkpoint is measured again at the new tau, else only checkpoints not in the series are.
    """
    t0 = time.perf_counter()
    say = log or ((lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda _m: None))
    check_p(p)
    if last < 1:
        raise UserError(f"--last must be >= 1 (got {last}); the paper calibrates on the last 5 checkpoints")
    from sparsinglaw.train.checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    info = run_config(run_dir)
    cks = [ck for ck in list_checkpoints(run_dir, log=say) if _intact(ck.path, say)]
    if not cks:
        raise UserError(f"{run_dir} has no complete checkpoint yet; train until the first checkpoint is "
                        "written (or lower --ckpt-every)")
    if len(cks) < last:
        raise UserError(f"{run_dir} has {len(cks)} complete checkpoint(s), fewer than the {last} that tau is "
                        f"calibrated on; train longer (or with a smaller --ckpt-every), or pass --last "
                        f"{len(cks)}")
    batches = val_batches(info, tokens, seq_len, batch_size)
    out = Path(out) if out is not None else run_dir
    settings = {"p": p, "tokens": sum(b.numel() for b in batches), "seq_len": int(batches[0].shape[1]),
                "batch_size": int(batches[0].shape[0]), "positions": positions, "dtype": dtype, "last": last}
    calib_cks = cks[-last:]
    names = {ck.path.name: ck for ck in cks}

    old = _read_previous(out / SERIES_FILE, say)
    reusable, why_all = _reusable(old, settings, names, say)
    if recalibrate:
        why_all = "--recalibrate"

    loaded: dict[str, torch.nn.Module] = {}
    run_dtype = dtype
    calib_names = [ck.path.name for ck in calib_cks]
    stored_tau = float(old["tau"]) if old is not None and not why_all else None
    calibrated = False
    if stored_tau is not None and old.get("calibration", {}).get("checkpoints") == calib_names \
            and all(n in reusable for n in calib_names):
        tau, calibration = stored_tau, old["calibration"]  # same last checkpoints: same tau, nothing to do
        message = "calibration checkpoints unchanged: tau kept"
    else:
        for ck in calib_cks:
            loaded[ck.path.name], run_dtype = _load(ck.path, device, dtype)
        cal = calibrate(list(loaded.items()), batches, p, positions, tau0=stored_tau or 0.1,
                        state_budget=state_budget, log=say)
        calibrated = True
        calibration = cal.to_json()
        if stored_tau is not None and abs(cal.tau / stored_tau - 1) <= TAU_RTOL:
            tau = stored_tau
            calibration["stored_tau_kept"] = True
            message = (f"recalibrated tau {cal.tau:.5f} is within {100 * TAU_RTOL:g}% of the stored "
                       f"{stored_tau:.5f}: kept it; measuring new checkpoints only")
        else:
            tau = cal.tau
            if stored_tau is not None:
                why_all = f"tau moved from {stored_tau:.5f} to {cal.tau:.5f} (> {100 * TAU_RTOL:g}%)"
            message = f"{why_all}: measuring every checkpoint at tau {tau:.5f}"
            reusable = {}
    say(message)

    meta = {"name": run_dir.resolve().name, "activation": cks[-1].meta.get("act"),
            "non_embedding_params": cks[-1].meta.get("non_embedding_params", info.get("non_embedding_params")),
            "width": cks[-1].meta.get("d_model"), "depth": cks[-1].meta.get("n_layers"),
            "preset": cks[-1].meta.get("preset"), "run": str(run_dir.resolve())}
    records = [reusable[ck.path.name] for ck in cks if ck.path.name in reusable]
    todo = [ck for ck in cks if ck.path.name not in reusable]
    path = out / SERIES_FILE
    from tqdm.auto import tqdm

    for ck in tqdm(todo, desc="checkpoints", unit="ckpt", disable=not progress, file=sys.stderr, leave=False):
        model = loaded.pop(ck.path.name, None)
        if model is None:
            model, run_dtype = _load(ck.path, device, dtype)
        rec = measure_checkpoint(model, batches, tau, ck, positions, a_per_f=calibration.get("a_per_f"))
        dev = next(model.parameters()).device
        del model
        _free(dev)
        records.append(rec)
        say(f"  measured {ck.path.name} ({ck.tokens:,} tokens): activation ratio {rec['activation_ratio']:.4f}, "
            f"PPL ratio {rec['ppl_ratio']:.5f}, {rec['seconds']:.1f} s")
        # written after every checkpoint: an interrupted call keeps what it measured (all at one tau)
        atomic_write_json(path, _series(records, meta, tau, calibration, settings))
    loaded.clear()
    series = _series(records, meta, tau, calibration, settings)
    series["settings"]["dtype_used"] = run_dtype
    atomic_write_json(path, series)
    files = write_plots(series, out) if plots else []
    measured = [ck.path.name for ck in todo]
    say(f"measured {len(measured)} checkpoint(s)" + (f": {', '.join(measured)}" if measured else "")
        + f"; kept {len(records) - len(measured)} from the stored series")
    return TrackResult(path=path, series=series, measured=measured,
                       reused=[r["name"] for r in records if r["name"] not in measured], calibrated=calibrated,
                       message=message, plots=files, seconds=time.perf_counter() - t0)


def write_plots(series: dict, out: str | Path) -> list[Path]:
    """The tracking charts: ratio vs tokens, per-layer heat map, dead neurons, first/last histograms."""
    from sparsinglaw import plots

    out = Path(out)
    return [plots.track_activation_ratio(series, out / "activation_ratio.png"),
            plots.track_layer_heatmap(series, out / "layer_ratio.png"),
            plots.track_dead_neurons(series, out / "dead_neurons.png"),
            plots.track_frequency(series, out / "neuron_frequency.png")]


# --- online: a cheap look at each checkpoint during training -----------------------------------------------

def _brief(res: Any, seconds: float) -> dict:
    ev = res.evaluation
    return {"p": round(100 * (res.target - 1), 10), "tau": res.tau, "activation_ratio": ev.activation_ratio,
            "ppl_ratio": ev.ppl_ratio, "ppl_dense": math.exp(ev.loss_dense), "measured_tokens": ev.tokens,
            "activation_ratio_interval": list(res.band.activation_ratio_interval) if res.band else None,
            "seconds": seconds, "message": res.message}


class OnlineTracker:
    """`train(..., on_checkpoint=OnlineTracker())`: CETT-PPL-p% of each new checkpoint with its own tau.

    Cheap on purpose (4K validation tokens, fast search to 0.1% in PPL ratio, warm-started from the previous
    checkpoint's tau): an early view while training runs.
    The curve the laws are fitted to comes from `track` (one tau for all checkpoints). A failure is
    logged and recorded, never raised: tracking must not stop a long training run.

    Called as `tracker(ckpt_dir, model=raw)` by the trainer, it measures the training `MuPTransformer`
    in memory: its weights are folded into a `LlamaForCausalLM` exactly as the saved checkpoint's (through
    the checkpoint's saved dtype, then the measurement dtype) on the model's own device, without reading
    the checkpoint's weights from disk; that Llama module is built once and its weights are overwritten
    at every later checkpoint. `tracker(ckpt_dir)` loads the checkpoint from disk (on `device`).
    """

    def __init__(self, p: float = 1.0, tokens: int = 4096, seq_len: int | None = None,
                 batch_size: int | None = None, device: str = "auto", dtype: str = "auto", ftol: float = 1e-3,
                 max_evals: int = 6, log: Callable[[str], Any] = print) -> None:
        check_p(p)
        self.p, self.tokens, self.seq_len, self.batch_size = p, tokens, seq_len, batch_size
        self.device, self.dtype, self.ftol, self.log = device, dtype, ftol, log
        self.max_evals = max_evals  # a cap on tau evaluations per checkpoint: the view is early and cheap
        self._batches: dict[Path, list[torch.Tensor]] = {}
        self._tau0 = 0.1  # the previous checkpoint's tau: a warm start saves sparse passes
        self.llama: torch.nn.Module | None = None  # the in-memory Llama, reused across checkpoints
        self._llama_key: tuple | None = None

    def __call__(self, ckpt_dir: str | Path, model: torch.nn.Module | None = None) -> dict:
        t0 = time.perf_counter()
        ckpt_dir = Path(ckpt_dir)
        run_dir = ckpt_dir.parent.parent
        rec: dict[str, Any] = {"checkpoint": ckpt_dir.name}
        try:
            meta = json.loads((ckpt_dir / "sparsinglaw.json").read_text())
            rec.update(step=meta.get("step"), tokens=meta.get("tokens"))
            if run_dir not in self._batches:
                info = run_config(run_dir)
                seq_len = min(self.seq_len or min(info.get("seq_len") or 512, 1024), self.tokens)
                self._batches[run_dir] = val_batches(info, self.tokens, seq_len, self.batch_size)
            if model is not None:
                net = self._in_memory(model, ckpt_dir)
                rec["source"] = "memory"
            else:
                net, _ = _load(ckpt_dir, self.device, self.dtype)
                rec["source"] = "disk"
            # judged by F alone (atol=None): an early, cheap view, not the series' calibrated measurement
            res = fast_search(Model(net), self._batches[run_dir], self.p, tau0=self._tau0,
                              acceptance=Acceptance(ftol=self.ftol, atol=None), max_evals=self.max_evals,
                              progress=False)
            if 0 < res.tau < 1:
                self._tau0 = res.tau
            if model is None:  # a loaded checkpoint is dropped; the in-memory Llama is kept for the next one
                dev = next(net.parameters()).device
                del net
                _free(dev)
            rec.update(_brief(res, time.perf_counter() - t0))
            rec["evaluations"] = len(res.history)
            self.log(f"online tracking {ckpt_dir.name}: activation ratio {rec['activation_ratio']:.4f} at tau "
                     f"{rec['tau']:.4f} (PPL ratio {rec['ppl_ratio']:.4f}), {rec['seconds']:.1f} s")
        except Exception as e:  # noqa: BLE001 - report and keep training
            rec.update(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                       seconds=time.perf_counter() - t0)
            self.log(f"online tracking {ckpt_dir.name} failed: {rec['error']}")
        rec["time"] = time.time()
        append_jsonl(run_dir / ONLINE_FILE, rec)
        return rec

    @torch.no_grad()
    def _in_memory(self, model: torch.nn.Module, ckpt_dir: Path) -> torch.nn.Module:
        """The Llama the checkpoint in `ckpt_dir` loads as, made from the training model's weights in memory."""
        from sparsinglaw.models import resolve_dtype
        from sparsinglaw.train.export import llama_config, llama_state_dict

        dev = next(model.parameters()).device
        dt = resolve_dtype(self.dtype, dev)
        saved = json.loads((ckpt_dir / "config.json").read_text()).get("dtype", "float32")
        saved_dt = resolve_dtype(saved, dev)
        key = (json.dumps(model.cfg.to_dict(), sort_keys=True), str(dev), dt)
        if self.llama is None or self._llama_key != key:
            from transformers import AutoModelForCausalLM

            self.llama = None
            _free(dev)
            # built in dt as from_pretrained does (weights in dt, RoPE buffers kept fp32; `.to(dt)` would
            # round those too), on the device, without moving the training process's random streams
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.device(dev):
                self.llama = AutoModelForCausalLM.from_config(llama_config(model.cfg, dt), dtype=dt)
            self.llama.eval().requires_grad_(False)
            self._llama_key = key
        # the checkpoint's rounding (fold in fp32, store as the saved dtype), then load_state_dict casts to dt
        self.llama.load_state_dict(llama_state_dict(model, saved_dt, device=None))
        return self.llama


# --- Hugging Face Trainer -------------------------------------------------------------------------------

class SparsityCallback(TrainerCallback):
    """Measure CETT-PPL-p% at every save of a Hugging Face `Trainer` and log it.

    Evaluation batches: `batches` (LongTensors of token ids), or `text` (documents, a file or folder)
    tokenised with `tokenizer` (default: the Trainer's processing_class). Each save appends
    {step, sparsity/activation_ratio, sparsity/tau, sparsity/ppl_ratio, ...} to `state.log_history` and
    to OUTPUT_DIR/sparsity.jsonl. Keep `tokens` small: it runs a few forward passes per save.
    """

    def __init__(self, batches: list[torch.Tensor] | None = None, text: Any = None, tokenizer: Any = None,
                 p: float = 1.0, tokens: int = 4096, seq_len: int = 256, batch_size: int = 4,
                 file: str = "sparsity.jsonl") -> None:
        check_p(p)
        if batches is None and text is None:
            raise UserError("SparsityCallback needs evaluation data: pass batches= or text=")
        self.batches, self.text, self.tokenizer = batches, text, tokenizer
        self.p, self.tokens, self.seq_len, self.batch_size, self.file = p, tokens, seq_len, batch_size, file
        self.records: list[dict] = []

    def _get_batches(self, tokenizer: Any) -> list[torch.Tensor]:
        if self.batches is None:
            from sparsinglaw.data import eval_batches

            tok = self.tokenizer or tokenizer
            if tok is None:
                raise UserError("SparsityCallback got text= but no tokenizer (pass tokenizer= or give the "
                                "Trainer a processing_class)")
            self.batches = eval_batches(tok, self.text, self.tokens, self.seq_len, self.batch_size)
        return self.batches

    def on_save(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                processing_class: Any = None, **kwargs: Any) -> None:
        if model is None or not state.is_world_process_zero:
            return
        t0 = time.perf_counter()
        net = getattr(model, "module", model)  # DDP / accelerate wrappers
        batches = self._get_batches(processing_class)
        was_training = net.training
        net.eval()
        try:
            res = fast_search(Model(net), batches, self.p, progress=False)
        finally:
            net.train(was_training)
        brief = _brief(res, time.perf_counter() - t0)
        rec = {"step": state.global_step, "epoch": state.epoch,
               **{f"sparsity/{k}": v for k, v in brief.items()}}
        self.records.append(rec)
        state.log_history.append(rec)
        append_jsonl(Path(args.output_dir) / self.file, rec)
