"""Command line: thin wrappers that parse options, call the library and print a summary.

Every user error surfaces as one line on stderr and exit status 2 (see `main`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from sparsinglaw.errors import UserError

BACKEND_HELP = ("performance switches, comma-separated name=on|off (fused_probe, probe_updates, fused_mask, "
                "fused_rope, fused_norm, cuda_graphs, causal_sdpa), or 'plain' for the torch path throughout")


def _backend(text: str):
    """The `Backend` of a --backend option, resolved once, before any work (a bad switch fails first)."""
    from sparsinglaw.backend import Backend, using

    return using(Backend.parse(text))


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Activation sparsity of LLMs: measure, train, track, fit (arXiv 2411.02335).")


def _load(model: str, device: str, dtype: str, data, tokens: int, seq_len: int, batch_size: int, quiet: bool):
    """Read the text (so bad data fails before the slow model load), load the model, pack batches."""
    from sparsinglaw.data import eval_batches, read_documents
    from sparsinglaw.models import load_model

    if tokens < 1 or seq_len < 2 or batch_size < 1:
        raise UserError("--tokens and --batch-size must be >= 1 and --seq-len >= 2")
    docs = read_documents(data)
    if quiet:
        from transformers.utils import logging

        logging.disable_progress_bar()
    lm = load_model(model, device=device, dtype=dtype)
    return lm, eval_batches(lm.tokenizer, docs, tokens, seq_len, batch_size)


@app.command()
def measure(
    model: str = typer.Option("smollm2-135m", help="HF folder, .gguf file, hub id, or smollm2-135m"),
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
    tokens: int = typer.Option(8192, help="evaluation tokens"),
    seq_len: int = typer.Option(512, help="tokens per sequence"),
    batch_size: int = typer.Option(4, help="sequences per batch (thresholds are searched per batch)"),
    calib_tokens: int | None = typer.Option(None, help="fast search: tokens whose dense intermediates are "
                                                          "held at once (default: all); the rest is streamed"),
    positions: str = typer.Option("all", help="which positions count: all | labeled"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", help="auto (fp32 on CPU, bf16 on GPU) | fp32 | bf16 | fp16"),
    out: Path = typer.Option(Path("sparsinglaw-out"), help="output folder"),
    quiet: bool = typer.Option(False, help="no progress output"),
    backend: str = typer.Option("", help=BACKEND_HELP),
) -> None:
    """Measure activation sparsity with one metric; write measurement.json, thresholds.json and plots."""
    from sparsinglaw.io import staged_dir
    from sparsinglaw.measure import _check_params
    from sparsinglaw.measure import measure as run_measure
    from sparsinglaw.sparse import Thresholds

    th = Thresholds.load(thresholds) if thresholds is not None else None
    if th is None:
        _check_params(metric, p, tau, k, eps)
    if search not in ("fast", "reference"):
        raise UserError(f"unknown --search {search!r}; use fast or reference")
    with _backend(backend):
        lm, batches = _load(model, device, dtype, data, tokens, seq_len, batch_size, quiet)
        result = run_measure(lm.model, batches, metric, p=p, tau=tau, k=k, eps=eps, topk_mode=topk_mode,
                             search=search, tol=tol, positions=positions, calib_tokens=calib_tokens,
                             thresholds=th, name=lm.name, progress=not quiet)
    with staged_dir(out) as stage:
        result.save(stage)
    print(result.summary())
    print(f"wrote {out}/measurement.json" + (", thresholds.json" if result.thresholds else "") + " and plots")


@app.command()
def fetch(name: str = typer.Argument(..., help="built-in model: smollm2-135m")) -> None:
    """Download and convert a built-in model once (the only command that needs the network)."""
    from sparsinglaw.models import fetch as run_fetch

    print(f"{name} is ready in {run_fetch(name)}")


@app.command()
def tradeoff(
    model: str = typer.Option("smollm2-135m", help="HF folder, .gguf file, hub id, or smollm2-135m"),
    data: Path | None = typer.Option(None, help="text source (default: CPython's English prose)"),
    tokens: int = typer.Option(4096, help="evaluation tokens"),
    seq_len: int = typer.Option(512, help="tokens per sequence"),
    batch_size: int = typer.Option(4, help="sequences per batch"),
    positions: str = typer.Option("all", help="which positions count: all | labeled"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", help="auto | fp32 | bf16 | fp16"),
    out: Path = typer.Option(Path("sparsinglaw-tradeoff"), help="output folder"),
    quiet: bool = typer.Option(False, help="no progress output"),
    backend: str = typer.Option("", help=BACKEND_HELP),
) -> None:
    """PPL versus activation ratio of CETT, Top-k, FAT and zero on the same data (paper Figure 2)."""
    from sparsinglaw.io import staged_dir
    from sparsinglaw.measure import tradeoff as run_tradeoff

    with _backend(backend):
        lm, batches = _load(model, device, dtype, data, tokens, seq_len, batch_size, quiet)
        result = run_tradeoff(lm.model, batches, positions=positions, name=lm.name, progress=not quiet)
    with staged_dir(out) as stage:
        result.save(stage)
    print(f"{'metric':<6} {'param':>10} {'act. ratio':>10} {'PPL ratio':>10}")
    for pt in result.points:
        print(f"{pt['metric']:<6} {pt['value']:>10.4g} {pt['activation_ratio']:>10.4f} {pt['ppl_ratio']:>10.5f}")
    print(f"wrote {out}/tradeoff.json and tradeoff.png")


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
) -> None:
    """Fit the sparsing laws: every form side by side, intervals, forecasts, fit.json and plots."""
    from sparsinglaw import laws
    from sparsinglaw.io import staged_dir

    if law not in ("tokens", "width-depth"):
        raise UserError(f"unknown --law {law!r}; choose tokens or width-depth")
    if form != "auto":
        laws.get_form(form)
    if target_ratio is not None and not 0 < target_ratio < 1:
        raise UserError(f"--target-ratio {target_ratio:g} is outside (0, 1); give a fraction like 0.07")
    wd_table = law == "width-depth" and len(paths) == 1 and not laws.is_series_file(paths[0])
    series = [] if wd_table else [laws.load_series(p) for p in paths]
    laws.unique_names(series)
    fits = [laws.fit_series(s, form=form, drop_first=drop_first, min_tokens=min_tokens, auto_drop=auto_drop,
                            bootstrap=bootstrap, level=level, target_ratio=target_ratio, seed=seed)
            for s in series]
    wd = None
    if wd_table:
        ratio, limit, names = laws.load_width_depth(paths[0])
        wd = laws.fit_width_depth(ratio, limit, names=names, bootstrap=bootstrap, level=level, seed=seed)
    elif law == "width-depth":
        wd = laws.width_depth_from_fits(fits, bootstrap=bootstrap, level=level, seed=seed)
    with staged_dir(out) as stage:
        laws.save_fits(fits, stage)
        if wd is not None:
            laws.save_width_depth(wd, stage)
    print(laws.summary_text(fits, wd))
    print(f"wrote {out}")
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
) -> None:
    """Train a µP Transformer (MiniCPM style) with any activation; checkpoints load with from_pretrained."""
    from sparsinglaw.train import TrainConfig, parse_tokens
    from sparsinglaw.train import train as run_train

    cfg = TrainConfig(out=str(out), tokens=parse_tokens(tokens), preset=preset, act=act, d_model=d_model,
                      n_layers=n_layers, head_dim=head_dim, batch_size=batch_size, seq_len=seq_len,
                      grad_accum=grad_accum, lr=lr, seed=seed, data=data or None, tokenizer=tokenizer,
                      vocab_size=vocab_size, device=device, dtype=dtype, compile=compile,
                      ckpt_every=parse_tokens(ckpt_every) if ckpt_every else None, log_every=log_every,
                      ckpt_schedule=ckpt_schedule, ckpt_count=ckpt_count, report_to=report_to,
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
    backend: str = typer.Option("", "--backend", help=BACKEND_HELP),
) -> None:
    """Sparsity over a run: one tau on the last checkpoints, every checkpoint at it -> series.json, plots."""
    from sparsinglaw.track import track as run_track
    from sparsinglaw.train import parse_tokens

    with _backend(backend):
        result = run_track(run, p=p, tokens=parse_tokens(tokens), seq_len=seq_len, batch_size=batch_size,
                           last=last, recalibrate=recalibrate, device=device, dtype=dtype, out=out,
                           progress=not quiet)
    print(result.summary())
    print(f"wrote {result.path} and {len(result.plots)} plots; fit with: sparsinglaw fit {result.path} "
          f"--out {result.path.parent / 'fit'}")


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
) -> None:
    """Run a study plan: train each run (log-spaced checkpoints), track, fit, write summary.json and report.html."""
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
) -> None:
    """Rebuild DIR/report.html (and with --refit, the fits and summary.json) from what is on disk."""
    from sparsinglaw.studies.report import write_report

    if refit:
        from sparsinglaw.studies.analysis import analyse

        if not (out / "plan.json").is_file():
            raise UserError(f"{out} is not a study folder (no plan.json); give the --out of `sparsinglaw study`")
        analyse(out)
    print(f"wrote {write_report(out)}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning user errors into one clear line and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click usage errors and out-of-memory get one line too
        import click

        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(2)
        if type(e).__name__ in ("OutOfMemoryError",) or "out of memory" in str(e).lower():
            print("error: out of memory; lower --batch-size (or --seq-len) and try again", file=sys.stderr)
            sys.exit(3)
        raise


if __name__ == "__main__":
    main()
