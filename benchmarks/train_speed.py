"""Training throughput and MFU of a preset, plus the cost of a checkpoint and of an `on_checkpoint` hook.

    python benchmarks/train_speed.py                       # 0.1b, bf16, seq 2048, batch 8, vocab 122,753 on GPU;
                                                           # the tiny preset on CPU
    python benchmarks/train_speed.py --hook pkg.mod:func   # also time a tracking hook on a real checkpoint
    python benchmarks/train_speed.py --online-tracker      # time `--track-online` (OnlineTracker on the
                                                           # in-memory model, and from disk for comparison)

--online-tracker trains on a real tiny corpus (CPython's pydoc prose, BPE of at most 4,096, 10%
validation; the model keeps its own vocabulary), then writes --checkpoints checkpoints a few steps apart
into a run folder the tracker understands (config.json naming the corpus) and times the tracker at each,
on the in-memory model as `train --track-online` does, and from disk for comparison. Its overhead is its
mean seconds per checkpoint (calls after the first, which also reads the validation batches and builds the
Llama module) over the measured training seconds between two checkpoints at the trainer's default interval,
run_tokens/20. The tau evaluations of each call are reported: they set the cost, and checkpoints a few
steps apart need fewer than a real run's (its online.jsonl has `evaluations` too). On a GPU without
--preset it runs two configurations: the 0.1b preset as above (a 2B-token run) and a run like the ReLU/SiLU
study's (5m preset, seq 1024 x batch 32, vocab 16,384, a 100M-token run). Writes
benchmarks/results/train_speed_<card>_tracker.json.

MFU counts every matmul: 6·N_non-embedding + 6·L·d·S (attention) + 6·d·V (LM head) FLOPs per token,
against 989 TFLOP/s (H100/H200 dense bf16). No dataset and no network: tokens are random unless --data
names a corpus (a built corpus folder or text files; the tokenizer then comes from it). The training
step is the trainer's own: same model, µP AdamW groups (fused on CUDA), bf16 autocast, torch.compile,
gradient clipping. Writes benchmarks/results/train_speed_<card>.json.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import record
import torch

from sparsinglaw.train.checkpoint import write_checkpoint
from sparsinglaw.train.export import save_hf
from sparsinglaw.train.model import ModelConfig, MuPTransformer, padded_vocab
from sparsinglaw.train.presets import get_preset
from sparsinglaw.train.trainer import PEAK_FLOPS, autocast_ctx, autocast_mode, hook_takes_model, make_optimizer


def load_hook(spec: str | None):
    """'package.module:function' -> the callable (it receives the checkpoint folder, and `model=` the
    in-memory model when it takes a `model` keyword, as in the trainer)."""
    if not spec:
        return None
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)


def tiny_corpus(folder: Path, vocab_size: int = 4096):
    """A real corpus with a validation split, built in seconds from CPython's pydoc prose."""
    from sparsinglaw.data import build_corpus, read_documents

    src = folder / "text"
    src.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(read_documents(None)):
        (src / f"doc{i:04d}.txt").write_text(doc)
    return build_corpus(folder / "corpus", [src], vocab_size=vocab_size, val_fraction=0.1, log=lambda _m: None)


def bench(args, device: torch.device, preset_name: str, seq_len: int, batch: int, vocab: int, run_tokens: float,
          corpus=None, hook=None, online: bool = False) -> dict:
    """Throughput of one configuration, then the cost of a checkpoint and of the hook / online tracker."""
    gpu = device.type == "cuda"
    preset = get_preset(preset_name)
    dtype = autocast_mode(args.dtype, device)
    steps = args.steps or (30 if gpu else 10)
    warm = args.warmup_steps if args.warmup_steps is not None else (8 if gpu else 2)
    use_compile = gpu if args.compile is None else args.compile
    if corpus is not None:
        vocab = max(vocab, corpus.vocab_size)
    cfg = ModelConfig(vocab_size=padded_vocab(vocab) if args.pad_vocab else vocab, d_model=preset.d_model,
                      n_layers=preset.n_layers, head_dim=preset.head_dim,
                      act=args.act, max_seq_len=seq_len)
    torch.manual_seed(0)
    raw = MuPTransformer(cfg).to(device)
    opt = make_optimizer(raw, preset.lr, 0.1, (0.9, 0.95), device)
    model = torch.compile(raw) if use_compile else raw
    trainer = Steps(raw, model, opt, device, dtype, batch, seq_len, vocab, corpus)

    print(f"{preset_name}: d={cfg.d_model} L={cfg.n_layers} heads={cfg.n_heads}x{cfg.head_dim} d_ff={cfg.d_ff} "
          f"V={vocab} | {batch}x{seq_len} tokens/step, {dtype}, compile={use_compile}, {device}", flush=True)
    t0 = time.perf_counter()
    for i in range(warm):
        trainer.step(i)
    trainer.sync()
    warm_s = time.perf_counter() - t0
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warm, warm + steps):
        t = time.perf_counter()
        trainer.step(i)
        trainer.sync()
        times.append(time.perf_counter() - t)
    total = sum(times)
    tps = steps * batch * seq_len / total
    fpt = cfg.flops_per_token(seq_len) - 6 * cfg.d_model * (cfg.vocab_size - vocab)  # FLOPs with the real V
    peak = (args.peak_tflops * 1e12) if args.peak_tflops else (PEAK_FLOPS.get(device.type) if dtype == "bf16"
                                                                else None)
    mfu = fpt * tps / peak if peak else None
    ckpt_every = run_tokens / 20
    train_s_per_ckpt = ckpt_every / tps
    ckpt = time_checkpoints(args, trainer, cfg, warm + steps, hook, online)
    ckpt.update(run_tokens=run_tokens, ckpt_every_tokens=ckpt_every, train_s_per_ckpt=train_s_per_ckpt,
                overhead_fraction=(ckpt["export_s"] + ckpt["hook_s"]) / train_s_per_ckpt)
    tracker = ckpt.pop("online_tracker", None)
    result = {
        "config": {"preset": preset_name, "act": cfg.act, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
                   "head_dim": cfg.head_dim, "d_ff": cfg.d_ff, "vocab_size": vocab,
                   "model_vocab": cfg.vocab_size, "seq_len": seq_len,
                   "batch_size": batch, "dtype": dtype, "compile": use_compile, "device": str(device),
                   "data": str(corpus.path) if corpus is not None else "random tokens", "timed_steps": steps,
                   "warmup_steps": warm},
        "non_embedding_params": cfg.non_embedding_params(), "flops_per_token": fpt,
        "tokens_per_s": tps, "step_ms": 1000 * total / steps, "step_ms_min": 1000 * min(times),
        "achieved_tflops": fpt * tps / 1e12, "peak_tflops": peak / 1e12 if peak else None, "mfu": mfu,
        "warmup_s": warm_s, "final_loss": trainer.last_loss,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if gpu else None,
        "checkpoint": ckpt,
    }
    if tracker is not None:
        for t in tracker.values():
            if "calls" in t:
                t["overhead_fraction"] = t["s_per_checkpoint"] / train_s_per_ckpt
        result["online_tracker"] = tracker
    print_result(result, hook is not None, online)
    return result


class Steps:
    """The trainer's own training step on random tokens or a corpus' train split."""

    def __init__(self, raw, model, opt, device, dtype, batch, seq_len, vocab, corpus):
        self.raw, self.model, self.opt, self.device, self.dtype = raw, model, opt, device, dtype
        self.batch, self.seq_len, self.vocab, self.corpus = batch, seq_len, vocab, corpus
        self.tokens = None if corpus is None else torch.from_numpy(
            corpus.tokens("train")[: 64 * batch * (seq_len + 1)].astype("int64"))
        self.last_loss: float | None = None

    def batch_at(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = self.batch, self.seq_len
        if self.tokens is not None:
            n = self.tokens.numel() // (s + 1)
            xy = torch.stack([self.tokens[r * (s + 1):(r + 1) * (s + 1)] for r in ((i * b + k) % n for k in range(b))])
        else:
            xy = torch.randint(0, self.vocab, (b, s + 1), generator=torch.Generator().manual_seed(i))
        xy = xy.to(self.device, non_blocking=True)
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()

    def step(self, i: int) -> None:
        x, y = self.batch_at(i)
        with autocast_ctx(self.device, self.dtype):
            loss = self.model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.raw.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.last_loss = loss.detach()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if isinstance(self.last_loss, torch.Tensor):
            self.last_loss = float(self.last_loss)


def time_checkpoints(args, trainer: Steps, cfg: ModelConfig, i: int, hook, online: bool) -> dict:
    """Checkpoints: the trainer's own atomic write (HF export + trainer state) into a run folder whose
    config.json names the corpus (what the tracker reads), then the hook / trackers, as in `train`."""
    gpu = trainer.device.type == "cuda"
    n_ckpt = max(2, args.checkpoints) if online else 2
    between = 5 if gpu else 2  # training steps between two checkpoints, so each has new weights
    trackers = {}
    if online:
        from sparsinglaw.track import OnlineTracker

        quiet = dict(device=str(trainer.device), dtype=args.dtype, log=lambda _m: None)
        trackers = {"memory": OnlineTracker(**quiet), "disk": OnlineTracker(**quiet)}
    export_times, hook_times, calls = [], [], {k: [] for k in trackers}
    tokens_per_step = trainer.batch * trainer.seq_len
    tokenizer = trainer.corpus.tokenizer() if trainer.corpus is not None else None
    with tempfile.TemporaryDirectory() as tmp:
        if trainer.corpus is not None:
            (Path(tmp) / "config.json").write_text(json.dumps(
                {"corpus": str(trainer.corpus.path), "seq_len": trainer.seq_len, "batch_size": trainer.batch,
                 "model": cfg.to_dict()}))
        for n in range(1, n_ckpt + 1):
            for _ in range(between if n > 1 else 0):
                trainer.step(i)
                i += 1
            trainer.sync()
            t = time.perf_counter()
            state = {"model": trainer.raw.state_dict(), "optimizer": trainer.opt.state_dict(), "step": i,
                     "tokens": i * tokens_per_step, "rng": {"torch": torch.get_rng_state()}}
            ck = write_checkpoint(tmp, i, lambda d: save_hf(trainer.raw, d, tokenizer),
                                  {"step": i, "tokens": i * tokens_per_step, "act": cfg.act}, state)
            export_times.append(time.perf_counter() - t)  # the first write pays one-off imports
            if hook is not None:
                hook_times.append(timed(trainer, hook, ck, **({"model": trainer.raw} if hook_takes_model(hook)
                                                              else {}))[0])
            for name, tr in trackers.items():
                seconds, rec = timed(trainer, tr, ck, **({"model": trainer.raw} if name == "memory" else {}))
                if "error" in rec:
                    raise SystemExit(f"online tracker ({name}) failed: {rec['error']}")
                calls[name].append({"seconds": seconds, **{k: rec[k] for k in (
                    "evaluations", "tau", "activation_ratio", "ppl_ratio", "measured_tokens")}})
        ckpt_mb = sum(f.stat().st_size for f in ck.iterdir()) / 1e6
    out = {"export_s": statistics.median(export_times[1:]), "size_mb": ckpt_mb, "hook": args.hook,
           "hook_s": statistics.median(hook_times[1:]) if hook_times else 0.0}
    if online:
        tr = {name: {"first_s": cs[0]["seconds"], "s_per_checkpoint": statistics.mean(c["seconds"] for c in cs[1:]),
                     "calls": cs} for name, cs in calls.items()}  # expected cost: the mean, not the median
        m = trackers["memory"]
        tr["settings"] = {"p": m.p, "tokens": m.tokens, "ftol": m.ftol, "checkpoints": n_ckpt,
                          "steps_between_checkpoints": between}
        out["online_tracker"] = tr
    return out


def timed(trainer: Steps, fn, *args, **kwargs):
    """(seconds, result) of fn(*args, **kwargs), the device synchronised on both sides."""
    trainer.sync()
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    trainer.sync()
    return time.perf_counter() - t, out


def print_result(result: dict, hooked: bool, online: bool) -> None:
    ck, fpt, tps, mfu = result["checkpoint"], result["flops_per_token"], result["tokens_per_s"], result["mfu"]
    every = f"{ck['ckpt_every_tokens']:,.0f} tok"
    rows = [("tokens/s", f"{tps:,.0f}"), ("step (ms)", f"{result['step_ms']:.1f}"),
            ("achieved TFLOP/s", f"{fpt * tps / 1e12:.3f}"),
            ("MFU", f"{100 * mfu:.1f}%" if mfu is not None else "n/a (no peak for this device/dtype)"),
            ("FLOPs/token", f"{fpt / 1e9:.3f} G"), ("non-emb params", f"{result['non_embedding_params'] / 1e6:.1f}M"),
            ("warm-up + compile (s)", f"{result['warmup_s']:.1f}"),
            ("checkpoint export (s)", f"{ck['export_s']:.2f} ({ck['size_mb']:.0f} MB)"),
            (f"training s per ckpt ({every})", f"{ck['train_s_per_ckpt']:.2f}")]
    if hooked or not online:
        rows += [("on_checkpoint hook (s)", f"{ck['hook_s']:.2f}" + ("" if hooked else " (no hook given)")),
                 (f"overhead at 1 ckpt / {every}", f"{100 * ck['overhead_fraction']:.2f}% of training time")]
    for name in ("memory", "disk") if online else ():
        t = result["online_tracker"][name]
        rows += [(f"online tracker, {name} (s/ckpt)",
                  f"{t['s_per_checkpoint']:.3f} (first call {t['first_s']:.2f}; evaluations "
                  f"{[c['evaluations'] for c in t['calls']]})"),
                 (f"  overhead at 1 ckpt / {every}", f"{100 * t['overhead_fraction']:.2f}% of training time")]
    if result["peak_memory_gib"] is not None:
        rows.append(("peak GPU memory (GiB)", f"{result['peak_memory_gib']:.1f}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="default: 0.1b on cuda, tiny on cpu")
    ap.add_argument("--act", default="relu")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on cuda) | bf16 | fp32")
    ap.add_argument("--seq-len", type=int, default=None, help="default: 2048 on cuda, the preset's on cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 8 on cuda, the preset's on cpu")
    ap.add_argument("--vocab", type=int, default=None, help="default: 122753 on cuda (MiniCPM), 2048 on cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 30 cuda / 10 cpu)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="untimed steps incl. compile (8 / 2)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--pad-vocab", action=argparse.BooleanOptionalAction, default=True,
                    help="round the model's vocabulary up to a multiple of 64, as the trainer does (FLOPs are "
                         "still counted with the unpadded vocabulary)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--data", default=None, help="corpus folder or text source (default: random tokens)")
    ap.add_argument("--hook", default=None, help="on_checkpoint callable as module:function")
    ap.add_argument("--online-tracker", action="store_true",
                    help="time OnlineTracker (--track-online) on the in-memory model and from disk, on a real "
                         "tiny corpus; on cuda without --preset: the 0.1b preset and the study's 5m run")
    ap.add_argument("--checkpoints", type=int, default=5, help="checkpoints the online tracker is timed on")
    ap.add_argument("--run-tokens", type=float, default=None,
                    help="run length for the checkpoint-overhead estimate (default 2e9 cuda / 2e6 cpu); "
                         "the trainer's default checkpoint interval is run_tokens/20")
    ap.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (default 989 on cuda)")
    ap.add_argument("--out", default=None, help="also copy the result JSON into this folder (it is written to "
                                                "benchmarks/results/train_speed_<card>[_tracker].json)")
    args = ap.parse_args()
    if args.online_tracker and args.hook:
        ap.error("--online-tracker times the tracker itself; leave out --hook")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    if gpu:
        device = torch.device("cuda", device.index or 0)  # set_device needs an index on torch 2.11
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")
    preset_name = args.preset or ("0.1b" if gpu else "tiny")
    preset = get_preset(preset_name)
    runs = [(preset_name, args.seq_len or (2048 if gpu else preset.seq_len),
             args.batch_size or (8 if gpu else preset.batch_size), args.vocab or (122753 if gpu else 2048),
             args.run_tokens or (2e9 if gpu else 2e6))]
    if args.online_tracker and gpu and args.preset is None:
        study = get_preset("5m")  # results/study: --preset 5m --tokens 100M --ckpt-every 5M, BPE 16,384
        runs.append(("5m", study.seq_len, study.batch_size, study.vocab_size, 1e8))

    with tempfile.TemporaryDirectory() as tmp:
        corpus = None
        if args.data:
            from sparsinglaw.data import get_corpus

            corpus = get_corpus([args.data], vocab_size=args.vocab or preset.vocab_size)
            runs = [(n, s, b, corpus.vocab_size, r) for n, s, b, _v, r in runs]
        elif args.online_tracker:
            t = time.perf_counter()
            corpus = tiny_corpus(Path(tmp), min(4096, *(v for _n, _s, _b, v, _r in runs)))  # ids < every V
            print(f"built a tiny corpus ({len(corpus.tokens('train')):,} train / {len(corpus.tokens('val')):,} "
                  f"val tokens, BPE {corpus.vocab_size}) in {time.perf_counter() - t:.1f} s", flush=True)
        results = []
        for name, seq_len, batch, vocab, run_tokens in runs:
            results.append(bench(args, device, name, seq_len, batch, vocab, run_tokens, corpus,
                                 load_hook(args.hook), args.online_tracker))
            if gpu:  # free the previous configuration's model, optimizer and compiled graphs
                torch._dynamo.reset()
                gc.collect()
                torch.cuda.empty_cache()

    record.write("train_speed", results, device, "tracker" if args.online_tracker else None, args.out,
                 command=" ".join(["python", "benchmarks/train_speed.py", *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
