"""Command line: thin wrappers that parse options, call the library and print a summary.

Exit status: 0 done; 2 bad input (one line on stderr, nothing written); 3 finished but the target was not
reached (results written and marked); 130 / 143 interrupted by SIGINT / SIGTERM (one line says what was
kept). Every option is checked before any model is loaded.
"""

from __future__ import annotations

import difflib
import os
import sys
import time
from pathlib import Path

import typer

from sparsinglaw import __version__
from sparsinglaw.console import (
    EXIT_USAGE,
    Interrupted,
    Phases,
    check_choice,
    check_out,
    close_progress_bars,
    install_signal_handlers,
    kept_message,
    on_interrupt,
    parse_tokens,
    process_start,
    restore_signal_handlers,
    set_threads,
)
from sparsinglaw.errors import NotReached, UserError

BACKEND_HELP = ("performance switches, comma-separated name=on|off (fused_probe, probe_updates, fused_mask, "
                "fused_rope, fused_norm, cuda_graphs, causal_sdpa), or 'plain' for the torch path throughout")


def _backend(text: str):
    """The `Backend` of a --backend option, resolved once, before any work (a bad switch fails first)."""
    from sparsinglaw.backend import Backend, using

    return using(Backend.parse(text))


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Activation sparsity of LLMs: measure, train, track, fit (arXiv 2411.02335).")

_T0 = time.perf_counter()  # set by `main` to the process start: the imports phase counts from there
MODEL_HELP = ("HF folder, .gguf file, hub id, or smollm2-135m-instruct-q4_1 (alias smollm2-135m: the "
              "SmolLM2-135M-Instruct Q4_1 GGUF, dequantised to fp32)")
THREADS_HELP = ("CPU threads (default: the CPUs this process may use minus those busy by the 1-minute load "
                "average, at least 1; oversubscribed threads run several times slower)")
POSITIONS = ("all", "labeled")


def _version(value: bool) -> None:
    if value:
        print(f"sparsinglaw {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Activation sparsity of LLMs: measure, train, track, fit (arXiv 2411.02335)."""


def _start(quiet: bool, threads: int | None) -> tuple[Phases, int]:
    """The phase clock (imports counted from the process start) and the CPU threads, set before any work."""
    global _QUICK_EXIT
    _QUICK_EXIT = True
    phases = Phases(quiet, start=_T0)
    n = set_threads(threads)  # imports torch
    # transformers imports scikit-learn when installed, for assisted generation only (about a third of its
    # import time); these commands never generate, so a console process of their own marks it absent
    if _CONSOLE:
        sys.modules.setdefault("sklearn", None)  # type: ignore[arg-type]
    # the library's and transformers' imports, timed here rather than inside the phase that first uses them
    from transformers import AutoModelForCausalLM  # noqa: F401
    from transformers.utils import logging

    import sparsinglaw.measure  # noqa: F401

    if quiet:
        logging.disable_progress_bar()
    phases.add("imports", time.perf_counter() - _T0)
    return phases, n


def _import_plots_meanwhile() -> None:
    """Import matplotlib on a side thread while the model loads and the search runs (about 0.5 s saved)."""
    import threading

    threading.Thread(target=lambda: __import__("sparsinglaw.plots"), daemon=True).start()


def _prepare(out: Path, model: str, device: str, dtype: str, seq_len: int, allow_long: bool,
             positions: str) -> None:
    """The checks that need no model (--positions, --out, device, dtype, --seq-len against the model's
    context where its config can be read), then what an interrupt keeps, and matplotlib on a side thread."""
    from sparsinglaw.models import check_context, model_context, resolve_device, resolve_dtype

    check_choice("--positions", positions, POSITIONS)
    check_out(out)
    resolve_dtype(dtype, resolve_device(device))
    warning = check_context(seq_len, model_context(model), model, allow_long)
    if warning:
        print(warning, file=sys.stderr)
    on_interrupt(_nothing_written(out))
    _import_plots_meanwhile()


def _load(phases: Phases, model: str, device: str, dtype: str, data, tokens: int, seq_len: int, batch_size: int,
          allow_long: bool, quiet: bool):
    """Read the text (so bad data fails before the slow model load), load the model, pack batches."""
    from sparsinglaw.data import eval_batches, read_documents
    from sparsinglaw.models import check_context, config_context, load_model

    if tokens < 1 or seq_len < 2 or batch_size < 1:
        raise UserError("--tokens and --batch-size must be >= 1 and --seq-len >= 2")
    with phases("data", f"reading {data or 'the default text (English prose shipped with CPython)'}"):
        docs = read_documents(data)
    with phases("model load", f"loading {model} ({device}, {dtype})"):
        lm = load_model(model, device=device, dtype=dtype)
    warning = check_context(seq_len, config_context(lm.model.config), lm.name, allow_long)
    if warning and "--allow-long" not in warning:
        print(warning, file=sys.stderr)
    with phases("data", f"tokenising {tokens} tokens into sequences of {seq_len}, {batch_size} per batch"):
        batches = eval_batches(lm.tokenizer, docs, tokens, seq_len, batch_size)
    return lm, batches


def _nothing_written(out: Path):
    return lambda: f"nothing written; {out} is as it was"


@app.command()
def measure(
    model: str = typer.Option("smollm2-135m-instruct-q4_1", help=MODEL_HELP),
    data: Path | None = typer.Option(None, help="text file, folder of .txt/.md, or JSONL with 'text' "
                                                   "(default: English prose shipped with CPython)"),
    metric: str = typer.Option("ppl", help="zero | topk | fat | cett | ppl (CETT-PPL-p%)"),
    p: float = typer.Option(1.0, help="PPL increase in percent, for --metric ppl"),
    tau: float | None = typer.Option(None, help="CETT tau in [0, 1], for --metric cett"),
    k: float | None = typer.Option(None, help="kept fraction in (0, 1], for --metric topk"),
    topk_mode: str = typer.Option("pooled", help="pooled (authors' code) | per-token (paper's prose)"),
    eps: float | None = typer.Option(None, help="FAT threshold on |activation|, for --metric fat"),
    search: str = typer.Option("fast", help="fast | reference (the authors' published search)"),
    tol: float = typer.Option(1e-6, help="tau tolerance of the reference search (authors: 1e-6 demo, 1e-3 pipeline)"),
    thresholds: Path | None = typer.Option(None, help="apply a frozen thresholds.json (static regime)"),
    tokens: str = typer.Option("8K", help="evaluation tokens (suffixes K, M)"),
    seq_len: int = typer.Option(512, help="tokens per sequence"),
    batch_size: int = typer.Option(4, help="sequences per batch (thresholds are searched per batch)"),
    calib_tokens: str | None = typer.Option(None, help="fast search: tokens whose dense intermediates are "
                                                          "held at once (suffixes K, M; default: all); the "
                                                          "rest is streamed"),
    positions: str = typer.Option("all", help="which positions count: all | labeled"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", help="auto (fp32 on CPU, bf16 on GPU) | fp32 | bf16 | fp16"),
    allow_long: bool = typer.Option(False, help="allow --seq-len beyond the model's context (with a warning)"),
    threads: int | None = typer.Option(None, help=THREADS_HELP),
    out: Path = typer.Option(Path("sparsinglaw-out"), help="output folder"),
    quiet: bool = typer.Option(False, help="no progress output"),
    backend: str = typer.Option("", help=BACKEND_HELP),
) -> None:
    """Measure activation sparsity with one metric; write measurement.json, thresholds.json and plots."""
    phases, n_threads = _start(quiet, threads)
    from sparsinglaw.io import staged_dir
    from sparsinglaw.measure import FILES, METRICS, _check_params
    from sparsinglaw.measure import measure as run_measure
    from sparsinglaw.sparse import Thresholds

    n_tokens = parse_tokens(tokens)
    n_calib = parse_tokens(calib_tokens, "--calib-tokens") if calib_tokens is not None else None
    th = Thresholds.load(thresholds) if thresholds is not None else None
    if th is None:
        check_choice("--metric", metric, METRICS)
        _check_params(metric, p, tau, k, eps)
    check_choice("--search", search, ("fast", "reference"))
    check_choice("--topk-mode", topk_mode, ("pooled", "per-token"))
    in_backend = _backend(backend)
    _prepare(out, model, device, dtype, seq_len, allow_long, positions)
    with in_backend:
        with staged_dir(out, owned=FILES) as stage:
            lm, batches = _load(phases, model, device, dtype, data, n_tokens, seq_len, batch_size, allow_long, quiet)
            what = {"ppl": f"searching the CETT tau whose PPL ratio is 1 + {p:g}% ({search} search)",
                    "cett": f"one pass per batch at tau {tau}"}.get(metric, "dense and sparse pass of every batch")
            with phases("search" if metric == "ppl" and th is None else "measure", what if th is None else
                        "applying the frozen thresholds to every batch"):
                result = run_measure(lm.model, batches, metric, p=p, tau=tau, k=k, eps=eps, topk_mode=topk_mode,
                                     search=search, tol=tol, positions=positions, calib_tokens=n_calib,
                                     thresholds=th, name=lm.name, progress=not quiet)
            static = result.timings.get("static_check_s", 0.0)
            last = "search" if "search" in phases.seconds else "measure"
            phases.seconds[last] -= static
            if result.static is not None:
                phases.add("static check", static)
            result.timings.update(phases=phases.seconds, threads=n_threads)
            with phases("plots", "drawing the per-layer, per-token and neuron-frequency charts"):
                files = result.plot(stage)
            with phases("writing", f"measurement.json{' and thresholds.json' if result.thresholds else ''}"):
                files = result.write(stage) + files
    print(result.summary())
    print(phases.closing([out / f.name for f in files], result.target_line()))
    if not result.reached:
        raise NotReached(f"{result.label} not reached: {result.search['message']} (best PPL ratio "
                         f"{result.ppl_ratio:.5f}); {out}/measurement.json says \"reached\": false")


@app.command()
def fetch(name: str = typer.Argument(..., help="built-in model: smollm2-135m")) -> None:
    """Download and convert a built-in model once (the only command that needs the network)."""
    from sparsinglaw.models import fetch as run_fetch

    print(f"{name} is ready in {run_fetch(name)}")


@app.command()
def tradeoff(
    model: str = typer.Option("smollm2-135m-instruct-q4_1", help=MODEL_HELP),
    data: Path | None = typer.Option(None, help="text source (default: CPython's English prose)"),
    tokens: str = typer.Option("4K", help="evaluation tokens (suffixes K, M)"),
    seq_len: int = typer.Option(512, help="tokens per sequence"),
    batch_size: int = typer.Option(4, help="sequences per batch"),
    positions: str = typer.Option("all", help="which positions count: all | labeled"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", help="auto | fp32 | bf16 | fp16"),
    allow_long: bool = typer.Option(False, help="allow --seq-len beyond the model's context (with a warning)"),
    threads: int | None = typer.Option(None, help=THREADS_HELP),
    out: Path = typer.Option(Path("sparsinglaw-tradeoff"), help="output folder"),
    quiet: bool = typer.Option(False, help="no progress output"),
    backend: str = typer.Option("", help=BACKEND_HELP),
) -> None:
    """PPL versus activation ratio of CETT, Top-k, FAT and zero on the same data (paper Figure 2)."""
    phases, n_threads = _start(quiet, threads)
    from sparsinglaw.io import staged_dir
    from sparsinglaw.measure import TRADEOFF_FILES
    from sparsinglaw.measure import tradeoff as run_tradeoff

    n_tokens = parse_tokens(tokens)
    in_backend = _backend(backend)
    _prepare(out, model, device, dtype, seq_len, allow_long, positions)
    with in_backend:
        with staged_dir(out, owned=TRADEOFF_FILES) as stage:
            lm, batches = _load(phases, model, device, dtype, data, n_tokens, seq_len, batch_size, allow_long, quiet)
            with phases("tradeoff", "every metric over a sweep of its parameter, batch by batch"):
                result = run_tradeoff(lm.model, batches, positions=positions, name=lm.name, progress=not quiet)
            result.timings.update(phases=phases.seconds, threads=n_threads)
            with phases("plots and writing", "tradeoff.json and tradeoff.png"):
                files = result.save(stage)
    print(f"{'metric':<6} {'param':>10} {'act. ratio':>10} {'PPL ratio':>10}")
    for pt in result.points:
        print(f"{pt['metric']:<6} {pt['value']:>10.4g} {pt['activation_ratio']:>10.4f} {pt['ppl_ratio']:>10.5f}")
    print(phases.closing([out / f.name for f in files]))


@app.command()
def compare(
    folders: list[Path] = typer.Argument(..., help="two or more measurement folders (or measurement.json files)"),
    out: Path = typer.Option(Path("sparsinglaw-compare"), "--out", help="output folder"),
    names: str | None = typer.Option(None, "--names", help="comma-separated labels, one per folder "
                                     "(default: each folder's name)"),
) -> None:
    """Measurements side by side: a table of the headline numbers, overlaid per-layer and frequency plots."""
    from sparsinglaw import compare as cmp
    from sparsinglaw.io import staged_dir

    check_out(out)
    rows = cmp.load(folders, names.split(",") if names else None)
    on_interrupt(_nothing_written(out))
    with staged_dir(out, owned=cmp.FILES) as stage:
        files = cmp.save(rows, stage)
    print(cmp.table(rows))
    print(f"wrote {', '.join(str(out / f.name) for f in files)}")


FIT_FILES = ("fit.json", "fit.png", "linearised.png", "summary.json", "runs.png", "runs_tokens_per_param.png",
             "widthdepth.json", "widthdepth.png", "*/fit.json")


@app.command()
def fit(
    paths: list[str] = typer.Argument(..., help="Series files (.json or .csv; a tracked run's series.json "
                                      "works), or with --law width-depth one width-depth file."),
    out: str = typer.Option(..., "--out", help="Output folder (written atomically)."),
    form: str = typer.Option("auto", "--form", help="auto | relu | silu | log | sigmoid."),
    drop_first: int = typer.Option(0, "--drop-first", help="Leave out the first K checkpoints."),
    min_tokens: float | None = typer.Option(None, "--min-tokens",
                                            help="Leave out checkpoints before T tokens."),
    auto_drop: bool = typer.Option(False, "--auto-drop", help="Also drop leading warm-up checkpoints the "
                                   "law cannot follow; each is reported with its reason."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for intervals (0 = none)."),
    law: str = typer.Option("tokens", "--law", help="tokens (A vs D) | width-depth (A0 vs d_h/L)."),
    target_ratio: float | None = typer.Option(None, "--target-ratio", help="Forecast the tokens needed to "
                                              "reach this activation ratio (a fraction, e.g. 0.07)."),
    level: float = typer.Option(0.95, "--level", help="Interval level."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    threads: int | None = typer.Option(None, "--threads", help=THREADS_HELP),
    weighted: bool = typer.Option(False, "--weighted", help="Weight each point by 1/its sigma (a tracked "
                                  "series' activation_ratio_sigma, from the noise of its PPL ratio)."),
) -> None:
    """Fit the sparsing laws: every form side by side, intervals, forecasts, fit.json and plots."""
    set_threads(threads)
    from sparsinglaw import laws
    from sparsinglaw.io import staged_dir

    check_choice("--law", law, ("tokens", "width-depth"))
    if form != "auto":
        check_choice("--form", form, ("auto", *laws.FORMS))
    check_out(out)
    if target_ratio is not None and not 0 < target_ratio < 1:
        raise UserError(f"--target-ratio {target_ratio:g} is outside (0, 1); give a fraction like 0.07")
    wd_table = law == "width-depth" and len(paths) == 1 and not laws.is_series_file(paths[0])
    series = [] if wd_table else [laws.load_series(p) for p in paths]
    laws.unique_names(series)
    fits = [laws.fit_series(s, form=form, drop_first=drop_first, min_tokens=min_tokens, auto_drop=auto_drop,
                            bootstrap=bootstrap, level=level, target_ratio=target_ratio, seed=seed,
                            weighted=weighted)
            for s in series]
    wd = None
    if wd_table:
        ratio, limit, names = laws.load_width_depth(paths[0])
        wd = laws.fit_width_depth(ratio, limit, names=names, bootstrap=bootstrap, level=level, seed=seed)
    elif law == "width-depth":
        wd = laws.width_depth_from_fits(fits, bootstrap=bootstrap, level=level, seed=seed)
    on_interrupt(_nothing_written(Path(out)))
    with staged_dir(out, owned=FIT_FILES) as stage:
        files = laws.save_fits(fits, stage)
        if wd is not None:
            files += laws.save_width_depth(wd, stage)
    print(laws.summary_text(fits, wd))
    print(Phases(start=_T0).closing([Path(out) / f.relative_to(stage) for f in files]))
    failed = [ft for ft in fits if not ft.success]
    if failed:
        raise UserError("; ".join(f"{ft.series.name}: the {ft.form} law could not be fitted: {ft.message}"
                                  for ft in failed) + f" (details in {out})")


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="run folder (config.json, log.jsonl, checkpoints/)"),
    preset: str = typer.Option("tiny", "--preset", help="tiny | 5m | 14m | 30m | 57m | 0.1b ... 2.4b | "
                               "0.1b-d<W>-l<L> (width-depth family); see docs/training.md"),
    act: str = typer.Option("relu", "--act", help="FFN activation: relu | silu | gelu | relu2 | "
                            "gelu_pytorch_tanh"),
    tokens: str = typer.Option("20M", "--tokens", help="training tokens (suffixes K, M, B)"),
    data: list[str] | None = typer.Option(None, "--data", help="built corpus folder, or text sources "
                                             "(files, folders, JSONL, Parquet; repeatable) to build one "
                                             "from; default: the text Python ships"),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="reuse a local model tokenizer "
                                            "instead of training a BPE one"),
    vocab_size: int | None = typer.Option(None, "--vocab-size", help="BPE vocabulary when the corpus "
                                             "is built here (default: the preset's)"),
    d_model: int | None = typer.Option(None, "--d-model", help="width d_h (overrides the preset)"),
    n_layers: int | None = typer.Option(None, "--n-layers", help="depth L (overrides the preset)"),
    head_dim: int | None = typer.Option(None, "--head-dim", help="attention head size"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="sequences per micro-batch"),
    seq_len: int | None = typer.Option(None, "--seq-len", help="tokens per sequence"),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="micro-batches per step, summed "
                                             "over all processes"),
    lr: float | None = typer.Option(None, "--lr", help="peak learning rate (µP: hidden matrices get "
                                       "lr/(d_h/256)); default 0.01"),
    ckpt_every: str | None = typer.Option(None, "--ckpt-every", help="tokens between checkpoints "
                                             "(default: tokens/20)"),
    ckpt_schedule: str = typer.Option("linear", "--ckpt-schedule", help="linear (every --ckpt-every "
                                      "tokens) | log (--ckpt-count log-spaced checkpoints: the laws are "
                                      "about log D)"),
    ckpt_count: int = typer.Option(24, "--ckpt-count", help="checkpoints of the log schedule"),
    report_to: str | None = typer.Option(None, "--report-to", help="tensorboard: also log training "
                                         "scalars to OUT/tensorboard (needs tensorboard installed)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest complete checkpoint"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | "
                              "fp32"),
    compile: bool | None = typer.Option(None, "--compile/--no-compile", help="torch.compile "
                                           "(default: on for GPU)"),
    seed: int = typer.Option(0, "--seed", help="initialisation and data-order seed"),
    log_every: int = typer.Option(10, "--log-every", help="steps between log.jsonl records"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    track_online: bool = typer.Option(False, "--track-online", help="after each checkpoint, a cheap "
                                      "CETT-PPL-1% measurement with its own tau (4K validation tokens) "
                                      "appended to OUT/online.jsonl; `sparsinglaw track` gives the curve"),
    threads: int | None = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Train a µP Transformer (MiniCPM style) with any activation; checkpoints load with from_pretrained."""
    set_threads(threads)
    from sparsinglaw.train import TrainConfig
    from sparsinglaw.train import train as run_train

    check_out(out)
    on_interrupt(lambda: _kept_checkpoint(out))

    cfg = TrainConfig(out=str(out), tokens=parse_tokens(tokens), preset=preset, act=act, d_model=d_model,
                      n_layers=n_layers, head_dim=head_dim, batch_size=batch_size, seq_len=seq_len,
                      grad_accum=grad_accum, lr=lr, seed=seed, data=data or None, tokenizer=tokenizer,
                      vocab_size=vocab_size, device=device, dtype=dtype, compile=compile,
                      ckpt_every=parse_tokens(ckpt_every, "--ckpt-every") if ckpt_every else None,
                      log_every=log_every, ckpt_schedule=ckpt_schedule, ckpt_count=ckpt_count, report_to=report_to,
                      progress=not quiet)
    from sparsinglaw.train.trainer import checkpoint_steps

    checkpoint_steps(1, ckpt_schedule, 1, ckpt_count)  # a bad schedule fails before the corpus is built
    if report_to not in (None, "tensorboard"):
        raise UserError(f"unknown --report-to {report_to!r}; use tensorboard")
    hook = None
    if track_online:
        from sparsinglaw.track import OnlineTracker

        hook = OnlineTracker(device=device, dtype=dtype)
    result = run_train(cfg, resume=resume, on_checkpoint=hook)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
        loss = f", final train loss {result.losses[-1]:.4f}" if result.losses else ""
        print(f"trained {result.steps} steps ({result.tokens:,} tokens){loss}{val}, "
              f"{result.tokens_per_s:,.0f} tokens/s; {len(result.checkpoints)} new checkpoints in "
              f"{out}/checkpoints")


def _kept_checkpoint(out: Path) -> str:
    from sparsinglaw.train import list_checkpoints

    cks = list_checkpoints(out)
    if not cks:
        return f"no checkpoint was written yet in {out}/checkpoints"
    return (f"kept {len(cks)} checkpoint(s) in {out}/checkpoints, the last {cks[-1].path.name} "
            f"({cks[-1].tokens:,} tokens); continue with --resume")


@app.command()
def track(
    run: Path = typer.Argument(..., help="run folder written by `sparsinglaw train --out RUN`"),
    p: float = typer.Option(1.0, "--p", help="PPL increase in percent that sets tau (CETT-PPL-p%)"),
    tokens: str = typer.Option("64K", "--tokens", help="validation tokens per checkpoint (suffixes K, M; "
                               "capped by the run's validation split)"),
    seq_len: int | None = typer.Option(None, "--seq-len", help="tokens per sequence (default: the run's)"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="sequences per batch; thresholds are "
                                          "searched per batch (default: the run's micro-batch)"),
    last: int = typer.Option(5, "--last", help="calibrate tau on this many last checkpoints together"),
    recalibrate: bool = typer.Option(False, "--recalibrate", help="recalibrate tau and measure every "
                                     "checkpoint again"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (fp32 on CPU, bf16 on GPU) | fp32 | bf16"),
    out: Path | None = typer.Option(None, "--out", help="folder for series.json and plots (default: RUN)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress output"),
    threads: int | None = typer.Option(None, "--threads", help=THREADS_HELP),
    backend: str = typer.Option("", "--backend", help=BACKEND_HELP),
) -> None:
    """Sparsity over a run: one tau on the last checkpoints, every checkpoint at it -> series.json, plots."""
    phases, _ = _start(quiet, threads)
    from sparsinglaw.models import resolve_device, resolve_dtype
    from sparsinglaw.track import SERIES_FILE
    from sparsinglaw.track import track as run_track

    n_tokens = parse_tokens(tokens)
    resolve_dtype(dtype, resolve_device(device))
    dest = check_out(out if out is not None else run)
    on_interrupt(lambda: _kept_series(dest / SERIES_FILE))
    in_backend = _backend(backend)
    t = time.perf_counter()  # the library reports its own steps (bad runs fail there in one line)
    with in_backend:
        result = run_track(run, p=p, tokens=n_tokens, seq_len=seq_len, batch_size=batch_size, last=last,
                           recalibrate=recalibrate, device=device, dtype=dtype, out=out, progress=not quiet)
    phases.add("track", time.perf_counter() - t)
    print(result.summary())
    print(phases.closing([result.path, *result.plots], f"target CETT-PPL-{p:g}% at one tau "
                         f"{result.series['tau']:.5f}"))
    print(f"fit with: sparsinglaw fit {result.path} --out {result.path.parent / 'fit'}")


def _kept_series(path: Path) -> str:
    import json

    try:
        series = json.loads(path.read_text())
        return (f"kept {path} with {len(series['checkpoints'])} checkpoint(s) measured at tau "
                f"{series['tau']:.5f}; run track again to measure the rest")
    except (OSError, ValueError, KeyError, TypeError):
        return f"no series written yet ({path} is as it was)"


# --- studies: plan -> runs -> fits -> report ------------------------------------------------------------

@app.command()
def study(
    plan: Path = typer.Argument(..., help="study plan (.toml); see studies/smoke.toml and docs/study.md"),
    out: Path = typer.Option(..., "--out", help="study folder (runs/, fits/, summary.json, report.html)"),
    only: str | None = typer.Option(None, "--only", help="comma-separated run names to work on"),
    shard: str | None = typer.Option(None, "--shard", help="K/N: work on runs K, K+N, ... (one process or "
                                     "GPU per shard, same --out)"),
    stop_after: float | None = typer.Option(None, "--stop-after", help="minutes; then stop cleanly at a "
                                            "step boundary (rerun the same command to continue)"),
    delete_checkpoints: bool = typer.Option(False, "--delete-checkpoints", help="delete each run's "
                                            "checkpoints once it is tracked (keeps series, logs, fits, PNGs)"),
    report_to: str | None = typer.Option(None, "--report-to", help="tensorboard: also log training scalars"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32"),
    compile: bool | None = typer.Option(None, "--compile/--no-compile", help="torch.compile (default: on "
                                        "for GPU)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate the plan and list its runs; write "
                                 "nothing"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    threads: int | None = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Run a study plan: train each run (log-spaced checkpoints), track, fit, write summary.json and report.html."""
    set_threads(threads)
    check_out(out)
    on_interrupt(lambda: f"the runs, checkpoints and series written so far are kept in {out}; rerun the same "
                 "command to continue")
    from sparsinglaw.studies import STOPPED_MESSAGE, StudyOptions, load_plan, run_study, select

    p = load_plan(plan)
    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    runs = select(p.runs, names, shard)
    if dry_run:
        from sparsinglaw.studies.plan import log_spacing

        print(f"plan {p.name}: {len(p.runs)} runs ({len(runs)} selected); data {', '.join(p.sources)}")
        for r in runs:
            print(f"  {r.name:<24} {r.activation:<5} d{r.d_model} L{r.n_layers} "
                  f"{r.non_embedding_params:>11,} params {r.tokens:>13,} tokens "
                  f"({r.tokens / r.non_embedding_params:.0f}/param) {len(log_spacing(r))} checkpoints"
                  + (f" [{r.family}]" if r.family else ""))
        return
    if stop_after is not None and stop_after <= 0:
        raise UserError(f"--stop-after must be a positive number of minutes, got {stop_after:g}")
    opts = StudyOptions(device=device, dtype=dtype, compile=compile, only=names, shard=shard,
                        stop_after=stop_after, delete_checkpoints=delete_checkpoints, report_to=report_to,
                        progress=not quiet)
    res = run_study(p, out, opts)
    print(f"runs finished now: {', '.join(res.done) or 'none'}; before: {', '.join(res.skipped) or 'none'}; "
          f"pending: {', '.join(res.pending) or 'none'}")
    if res.stopped:
        print(STOPPED_MESSAGE)
    elif not res.pending:
        print(f"study complete: {out}/report.html")
    else:
        print(f"selected runs complete; {len(res.pending)} run(s) of the plan are left to other shards")


@app.command()
def report(
    out: Path = typer.Argument(..., help="a study folder written by `sparsinglaw study`"),
    refit: bool = typer.Option(False, "--refit", help="refit the laws from the runs' series first"),
    threads: int | None = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Rebuild DIR/report.html (and with --refit, the fits and summary.json) from what is on disk."""
    set_threads(threads)
    from sparsinglaw.studies.report import write_report

    if refit:
        from sparsinglaw.studies.analysis import analyse

        if not (out / "plan.json").is_file():
            raise UserError(f"{out} is not a study folder (no plan.json); give the --out of `sparsinglaw study`")
        analyse(out)
    print(f"wrote {write_report(out)}")


def _click_exceptions():
    """The click that typer runs on: typer >= 0.20 bundles its own (`typer._click`), older ones use click."""
    bundled = getattr(typer, "_click", None)
    if bundled is not None:
        return bundled.exceptions
    import click

    return click.exceptions


def _usage_line(e: Exception) -> str:
    """A click usage error as one line: the problem, the closest valid option, where to read more."""
    possible = getattr(e, "possibilities", None)
    if possible:  # an unknown option: name the closest one only
        closest = difflib.get_close_matches(e.option_name, possible, n=1, cutoff=0.0)[0]
        msg = f"no such option: {e.option_name} (did you mean {closest}?)"
    else:
        msg = " ".join(e.format_message().split()).replace(". Did you mean", "; did you mean")
    ctx = getattr(e, "ctx", None)
    cmd = ctx.command_path if ctx is not None else "sparsinglaw"
    return f"{msg[:1].lower() + msg[1:]} (see `{cmd} --help`)"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app; map errors, usage errors and signals to one line and an exit status.

    2: bad input or usage; 3: finished without reaching the target; 128 + N: interrupted by signal N.
    """
    global _T0, _CONSOLE
    _T0 = process_start() if argv is None else time.perf_counter()
    _CONSOLE = argv is None  # a console process of its own (not a caller's, e.g. tests)
    previous = install_signal_handlers()
    try:
        code = _run(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    finally:
        restore_signal_handlers(previous)
    if _CONSOLE and _QUICK_EXIT:
        # the results are written and reported: skip the interpreter's teardown of torch and transformers
        # (1-1.5 s on a CPU), as the process would do nothing more than free memory
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


_QUICK_EXIT = False  # set by the commands whose exit may skip the interpreter's teardown
_CONSOLE = False  # this process is the console command itself


def _run(argv: list[str] | None) -> int:
    errors = _click_exceptions()
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="sparsinglaw")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Interrupted as e:
        close_progress_bars()
        print(f"interrupted ({e}): {kept_message()}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except errors.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # no command: the help was shown
            sys.exit(EXIT_USAGE)
        print(f"error: {_usage_line(e)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except errors.ClickException as e:
        print(f"error: {' '.join(e.format_message().split())}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # out-of-memory gets one line too
        if type(e).__name__ in ("OutOfMemoryError",) or "out of memory" in str(e).lower():
            print("error: out of memory; lower --batch-size (or --seq-len) and try again", file=sys.stderr)
            sys.exit(3)
        raise
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    main()
