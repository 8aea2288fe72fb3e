"""Run a study: build the corpus once, then train -> track -> finish each run, then fit and report.

Layout of a study folder DIR:

    DIR/plan.toml, DIR/plan.json      the plan as given and as resolved (sources, tracking, every run)
    DIR/corpus.json                   the corpus used: path, tokens, per-source mix
    DIR/runs/NAME/spec.json           the run's resolved spec (a rerun with other settings is refused)
    DIR/runs/NAME/...                 the trainer's run folder: config.json, log.jsonl, checkpoints/,
                                      online.jsonl, series.json and tracking PNGs
    DIR/runs/NAME/domains.json        the final checkpoint's neuron frequencies on two text domains
    DIR/runs/NAME/run.json            written last: the run is finished (training speed, epochs, ...)
    DIR/summary.json, DIR/report.html the fits and the page (`sparsinglaw report DIR` rebuilds them)

Re-running the same command skips finished runs and resumes an interrupted one from its newest state
(a checkpoint, or the paused state that `stop_after` leaves). Runs are independent: `only` / `shard`
give any subset to another process or GPU, all writing into the same DIR.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsinglaw.errors import UserError
from sparsinglaw.io import atomic_write_json
from sparsinglaw.studies.plan import Plan, RunSpec, select

RUN_DONE = "run.json"
STOPPED_MESSAGE = "stopped for time; run the same command again to continue"


@dataclass
class StudyOptions:
    """How the study runs (not what it computes): resolved once, recorded in DIR/study.json."""

    device: str = "auto"
    dtype: str = "auto"
    compile: bool | None = None
    only: list[str] | None = None
    shard: str | None = None
    stop_after: float | None = None  # minutes
    delete_checkpoints: bool = False
    report_to: str | None = None  # "tensorboard"
    progress: bool = True


@dataclass
class StudyResult:
    out: Path
    done: list[str] = field(default_factory=list)  # finished in this call
    skipped: list[str] = field(default_factory=list)  # finished before
    stopped: bool = False
    pending: list[str] = field(default_factory=list)  # runs of the plan not finished yet
    summary: dict | None = None


def _same(a: dict, b: dict) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def _check_study_dir(plan: Plan, out: Path) -> None:
    """A DIR already used by another plan's data or tracking settings is refused (its runs would mix)."""
    old = out / "plan.json"
    if not old.is_file():
        return
    prev = json.loads(old.read_text())
    for key, now in (("data", plan.data_settings()), ("tracking", plan.tracking)):
        if not _same(prev.get(key, {}), now):
            raise UserError(f"{out} holds a study with different {key} settings; use another --out "
                            "(or delete that folder)")
    for run in plan.runs:
        spec_file = out / "runs" / run.name / "spec.json"
        if spec_file.is_file() and not _same(json.loads(spec_file.read_text()), run.to_dict()):
            raise UserError(f"run {run.name} in {out} was started with other settings; rename the run in "
                            f"the plan or delete {spec_file.parent}")


def train_config(spec: RunSpec, run_dir: Path, corpus: Path, opts: StudyOptions):
    """The trainer's config of one run (log-spaced checkpoints, the study's shared corpus)."""
    from sparsinglaw.train import TrainConfig

    return TrainConfig(out=str(run_dir), tokens=spec.tokens, preset=spec.preset, act=spec.activation,
                       d_model=spec.d_model, n_layers=spec.n_layers, head_dim=spec.head_dim,
                       batch_size=spec.batch_size, seq_len=spec.seq_len, grad_accum=spec.grad_accum,
                       lr=spec.lr, seed=spec.seed, data=[str(corpus)], device=opts.device, dtype=opts.dtype,
                       compile=opts.compile, ckpt_schedule="log", ckpt_count=spec.checkpoints,
                       ckpt_first=spec.first_checkpoint, progress=opts.progress, report_to=opts.report_to)


def run_study(plan: Plan, out: str | Path, opts: StudyOptions | None = None,
              log: Callable[[str], Any] = print) -> StudyResult:
    """Train, track and finish the plan's (selected) runs into `out`, then fit and write the report."""
    from sparsinglaw.data import get_corpus

    opts = opts or StudyOptions()
    out = Path(out)
    runs = select(plan.runs, opts.only, opts.shard)
    _check_study_dir(plan, out)
    if opts.report_to not in (None, "tensorboard"):
        raise UserError(f"unknown --report-to {opts.report_to!r}; use tensorboard")
    if opts.report_to:
        from sparsinglaw.train.trainer import tensorboard_writer

        tensorboard_writer(None)  # a clear error now if tensorboard is missing
    deadline = time.time() + 60 * opts.stop_after if opts.stop_after else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.toml").write_text(plan.text)
    atomic_write_json(out / "plan.json", plan.to_dict())

    corpus = get_corpus(plan.sources, vocab_size=plan.vocab_size or 8192, tokenizer=plan.tokenizer,
                        val_fraction=plan.val_fraction, log=log)
    atomic_write_json(out / "corpus.json", {"path": str(corpus.path), **corpus.meta})
    if corpus.meta["val_tokens"] < plan.tracking["tokens"]:
        log(f"warning: the validation split has {corpus.meta['val_tokens']:,} tokens, fewer than the "
            f"{plan.tracking['tokens']:,} per checkpoint the plan tracks with; every measurement uses all of "
            "them (raise [data] val_fraction for more)")
    result = StudyResult(out)
    for spec in runs:
        run_dir = out / "runs" / spec.name
        if (run_dir / RUN_DONE).is_file():
            result.skipped.append(spec.name)
            continue
        if deadline is not None and time.time() >= deadline:
            result.stopped = True
            break
        log(f"== run {spec.name}: {spec.non_embedding_params:,} non-embedding params, {spec.tokens:,} tokens")
        if not run_study_run(spec, run_dir, corpus.path, plan.tracking, opts, deadline, log):
            result.stopped = True
            break
        result.done.append(spec.name)
    result.pending = [r.name for r in plan.runs if not (out / "runs" / r.name / RUN_DONE).is_file()]
    from sparsinglaw.studies.analysis import analyse

    if any((out / "runs" / r.name / RUN_DONE).is_file() for r in plan.runs):
        result.summary = analyse(out, log=log)
    return result


def run_study_run(spec: RunSpec, run_dir: Path, corpus: Path, tracking: dict, opts: StudyOptions,
                  deadline: float | None, log: Callable[[str], Any]) -> bool:
    """One run: train (resuming), track, measure domains, write run.json. False if stopped for time."""
    import torch

    from sparsinglaw.track import OnlineTracker, track
    from sparsinglaw.train import list_checkpoints, train
    from sparsinglaw.train.checkpoint import PAUSE_FILE

    torch._dynamo.reset()  # a fresh compile cache per run: guards of earlier runs' models must not pile up
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "spec.json", spec.to_dict())
    cfg = train_config(spec, run_dir, corpus, opts)
    total = spec.tokens // spec.tokens_per_step
    cks = list_checkpoints(run_dir)
    t0 = time.time()
    if not cks or cks[-1].step < total:
        hook = OnlineTracker(p=tracking["p"], device=opts.device, log=log) if tracking["online"] else None
        # resume only from a state on this machine (a run folder carried from elsewhere has none)
        resume = bool(cks) or (run_dir / PAUSE_FILE).is_file()
        res = train(cfg, resume=resume, on_checkpoint=hook, log=log, deadline=deadline)
        _add_time(run_dir, "train_s", time.time() - t0)
        if res.stopped:
            return False
    if deadline is not None and time.time() >= deadline:
        return False
    t1 = time.time()
    series = track(run_dir, p=tracking["p"], tokens=tracking["tokens"], seq_len=tracking["seq_len"],
                   batch_size=tracking["batch_size"], last=tracking["last"], device=opts.device,
                   dtype=opts.dtype, progress=opts.progress, log=log).series
    domains = measure_domains(run_dir, series, opts)
    atomic_write_json(run_dir / "domains.json", domains)
    _add_time(run_dir, "track_s", time.time() - t1)
    atomic_write_json(run_dir / RUN_DONE, finish_record(spec, run_dir, corpus))
    if opts.delete_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    log(f"run {spec.name} finished: final activation ratio {series['activation_ratio'][-1]:.4f}, "
        f"val loss {series['val_loss'][-1]:.4f}")
    return True


def _add_time(run_dir: Path, key: str, seconds: float) -> None:
    """Wall time spent on the run, summed over the calls that worked on it (stopped ones included)."""
    path = run_dir / "times.json"
    times = json.loads(path.read_text()) if path.is_file() else {}
    times[key] = times.get(key, 0.0) + seconds
    atomic_write_json(path, times)


def measure_domains(run_dir: Path, series: dict, opts: StudyOptions) -> dict:
    """Per-neuron activation frequency of the final checkpoint on the run's validation split and on
    English prose (CPython's pydoc topics), at the series' tau: the paper's Figure 9 data."""
    from sparsinglaw.data import eval_batches, open_corpus, read_documents
    from sparsinglaw.measure import measure
    from sparsinglaw.track import _load, val_batches
    from sparsinglaw.train import list_checkpoints

    info = json.loads((run_dir / "config.json").read_text())
    ck = list_checkpoints(run_dir)[-1]
    model, _ = _load(ck.path, opts.device, opts.dtype)
    settings = series["settings"]
    seq_len, batch_size, tokens = settings["seq_len"], settings["batch_size"], settings["tokens"]
    tok = open_corpus(info["corpus"]).tokenizer()
    domains = {"validation split": val_batches(info, tokens, seq_len, batch_size),
               "English prose": eval_batches(tok, read_documents(None), tokens, seq_len, batch_size)}
    out: dict[str, Any] = {"checkpoint": ck.path.name, "tokens": ck.tokens, "tau": series["tau"], "domains": {}}
    for name, batches in domains.items():
        m = measure(model, batches, metric="cett", tau=series["tau"], static_check=False, name=name,
                    progress=False)
        freq = m.neuron_frequency
        out["domains"][name] = {
            "tokens": sum(b.numel() for b in batches), "activation_ratio": m.activation_ratio,
            "ppl_ratio": m.ppl_ratio, "dead_neuron_ratio": m.dead_neuron_ratio,
            "frequency_histogram": m.frequency_histogram,
            "frequency_quantiles": _quantiles(freq) if freq is not None else None}
    return out


def _quantiles(freq: Any) -> dict:
    import numpy as np

    f = np.asarray(freq, dtype=float).ravel()
    return {f"q{q}": float(np.quantile(f, q / 100)) for q in (5, 25, 50, 75, 95)}


def finish_record(spec: RunSpec, run_dir: Path, corpus: Path) -> dict:
    """What the report needs about a finished run: speed (median tokens/s and MFU of the logged
    windows), final losses, epochs over the corpus, wall times."""
    from sparsinglaw.data import open_corpus

    recs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in recs if "loss" in r and r.get("tokens_per_s")]
    # the first window holds compilation: leave it out of the speed when there are others
    speed = steps[1:] if len(steps) > 2 else steps
    mfu = [r["mfu"] for r in speed if r.get("mfu") is not None]
    cfg = json.loads((run_dir / "config.json").read_text())
    train_tokens = int(open_corpus(corpus).meta["train_tokens"])
    times = json.loads((run_dir / "times.json").read_text()) if (run_dir / "times.json").is_file() else {}
    vals = [r["val_loss"] for r in recs if r.get("val_loss") is not None]
    trained = cfg["total_steps"] * cfg["tokens_per_step"]
    return {"name": spec.name, "spec": spec.to_dict(), "tokens_trained": trained,
            "tokens_per_param": trained / spec.non_embedding_params,
            "epochs": trained / train_tokens if train_tokens else None,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in speed) if speed else None,
            "mfu": statistics.median(mfu) if mfu else None, "device": cfg.get("device"),
            "dtype": cfg.get("dtype"), "final_train_loss": steps[-1]["loss"] if steps else None,
            "final_val_loss": vals[-1] if vals else None, "times": times,
            "loss_curve": [{"tokens": r["tokens"], "loss": r["loss"]} for r in steps],
            "val_curve": [{"tokens": r["tokens"], "val_loss": r["val_loss"]} for r in recs
                          if r.get("val_loss") is not None],
            "finished": time.time()}
