"""Training throughput and MFU of a preset, plus the cost of a checkpoint and of an `on_checkpoint` hook.

    python benchmarks/train_speed.py                       # 0.1b, bf16, seq 2048, batch 8, vocab 122,753 on GPU;
                                                           # the tiny preset on CPU
    python benchmarks/train_speed.py --hook pkg.mod:func   # also time a tracking hook on a real checkpoint

MFU counts every matmul: 6·N_non-embedding + 6·L·d·S (attention) + 6·d·V (LM head) FLOPs per token,
against 989 TFLOP/s (H100/H200 dense bf16). No dataset and no network: tokens are random unless --data
names a corpus (a built corpus folder or text files; the tokenizer then comes from it). The training
step is the trainer's own: same model, µP AdamW groups (fused on CUDA), bf16 autocast, torch.compile,
gradient clipping. Writes benchmarks/results/train_speed_<device>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparsinglaw.train.checkpoint import write_checkpoint
from sparsinglaw.train.export import save_hf
from sparsinglaw.train.model import ModelConfig, MuPTransformer
from sparsinglaw.train.presets import get_preset
from sparsinglaw.train.trainer import PEAK_FLOPS, autocast_ctx, make_optimizer, resolve_dtype

RESULTS = Path(__file__).parent / "results"


def load_hook(spec: str | None):
    """'package.module:function' -> the callable (it receives the checkpoint folder)."""
    if not spec:
        return None
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)


def hardware(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count())
    return info


def versions() -> dict:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


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
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--data", default=None, help="corpus folder or text source (default: random tokens)")
    ap.add_argument("--hook", default=None, help="on_checkpoint callable as module:function")
    ap.add_argument("--run-tokens", type=float, default=None,
                    help="run length for the checkpoint-overhead estimate (default 2e9 cuda / 2e6 cpu); "
                         "the trainer's default checkpoint interval is run_tokens/20")
    ap.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (default 989 on cuda)")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/train_speed_<dev>.json)")
    args = ap.parse_args()

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
    dtype = resolve_dtype(args.dtype, device)
    seq_len = args.seq_len or (2048 if gpu else preset.seq_len)
    batch = args.batch_size or (8 if gpu else preset.batch_size)
    steps = args.steps or (30 if gpu else 10)
    warm = args.warmup_steps if args.warmup_steps is not None else (8 if gpu else 2)
    use_compile = gpu if args.compile is None else args.compile
    run_tokens = args.run_tokens or (2e9 if gpu else 2e6)

    tokenizer = None
    corpus_tokens = None
    vocab = args.vocab or (122753 if gpu else 2048)
    if args.data:
        from sparsinglaw.data import get_corpus

        corpus = get_corpus([args.data], vocab_size=args.vocab or preset.vocab_size)
        tokenizer, vocab = corpus.tokenizer(), corpus.vocab_size
        corpus_tokens = torch.from_numpy(corpus.tokens("train")[: 64 * batch * (seq_len + 1)].astype("int64"))

    cfg = ModelConfig(vocab_size=vocab, d_model=preset.d_model, n_layers=preset.n_layers, head_dim=preset.head_dim,
                      act=args.act, max_seq_len=seq_len)
    torch.manual_seed(0)
    raw = MuPTransformer(cfg).to(device)
    opt = make_optimizer(raw, preset.lr, 0.1, (0.9, 0.95), device)
    model = torch.compile(raw) if use_compile else raw

    def batch_at(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if corpus_tokens is not None:
            n = corpus_tokens.numel() // (seq_len + 1)
            rows = [(i * batch + r) % n for r in range(batch)]
            xy = torch.stack([corpus_tokens[r * (seq_len + 1):(r + 1) * (seq_len + 1)] for r in rows])
        else:
            xy = torch.randint(0, vocab, (batch, seq_len + 1), generator=torch.Generator().manual_seed(i))
        xy = xy.to(device, non_blocking=True)
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()

    def step(i: int) -> torch.Tensor:
        x, y = batch_at(i)
        with autocast_ctx(device, dtype):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    print(f"{preset_name}: d={cfg.d_model} L={cfg.n_layers} heads={cfg.n_heads}x{cfg.head_dim} d_ff={cfg.d_ff} "
          f"V={vocab} | {batch}x{seq_len} tokens/step, {dtype}, compile={use_compile}, {device}", flush=True)
    t0 = time.perf_counter()
    for i in range(warm):
        step(i)
    sync()
    warm_s = time.perf_counter() - t0
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    loss = None
    for i in range(warm, warm + steps):
        t = time.perf_counter()
        loss = step(i)
        sync()
        times.append(time.perf_counter() - t)
    total = sum(times)
    tokens_per_step = batch * seq_len
    tps = steps * tokens_per_step / total
    fpt = cfg.flops_per_token(seq_len)
    peak = (args.peak_tflops * 1e12) if args.peak_tflops else (PEAK_FLOPS.get(device.type) if dtype == "bf16"
                                                                else None)
    mfu = fpt * tps / peak if peak else None

    # Checkpoint cost: the trainer's own atomic write (HF export + trainer state), then the hook.
    hook = load_hook(args.hook)
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):  # the first write pays one-off imports; time the second, as in a long run
            sync()
            t = time.perf_counter()
            state = {"model": raw.state_dict(), "optimizer": opt.state_dict(), "step": n,
                     "tokens": n * tokens_per_step, "rng": {"torch": torch.get_rng_state()}}
            ck = write_checkpoint(tmp, n, lambda d: save_hf(raw, d, tokenizer),
                                  {"step": n, "tokens": n * tokens_per_step, "act": cfg.act}, state)
            export_s = time.perf_counter() - t
        hook_s = 0.0
        if hook is not None:
            t = time.perf_counter()
            hook(ck)
            sync()
            hook_s = time.perf_counter() - t
        ckpt_mb = sum(f.stat().st_size for f in ck.iterdir()) / 1e6
    ckpt_every = run_tokens / 20
    train_s_per_ckpt = ckpt_every / tps
    overhead = (export_s + hook_s) / train_s_per_ckpt

    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(device), "versions": versions(),
        "config": {"preset": preset_name, "act": cfg.act, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
                   "head_dim": cfg.head_dim, "d_ff": cfg.d_ff, "vocab_size": vocab, "seq_len": seq_len,
                   "batch_size": batch, "dtype": dtype, "compile": use_compile, "device": str(device),
                   "data": args.data or "random tokens", "timed_steps": steps, "warmup_steps": warm},
        "non_embedding_params": cfg.non_embedding_params(), "flops_per_token": fpt,
        "tokens_per_s": tps, "step_ms": 1000 * total / steps, "step_ms_min": 1000 * min(times),
        "achieved_tflops": fpt * tps / 1e12, "peak_tflops": peak / 1e12 if peak else None, "mfu": mfu,
        "warmup_s": warm_s, "final_loss": float(loss) if loss is not None else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if gpu else None,
        "checkpoint": {"export_s": export_s, "size_mb": ckpt_mb, "hook": args.hook, "hook_s": hook_s,
                       "run_tokens": run_tokens, "ckpt_every_tokens": ckpt_every,
                       "train_s_per_ckpt": train_s_per_ckpt, "overhead_fraction": overhead},
    }
    rows = [("tokens/s", f"{tps:,.0f}"), ("step (ms)", f"{1000 * total / steps:.1f}"),
            ("achieved TFLOP/s", f"{fpt * tps / 1e12:.3f}"),
            ("MFU", f"{100 * mfu:.1f}%" if mfu is not None else "n/a (no peak for this device/dtype)"),
            ("FLOPs/token", f"{fpt / 1e9:.3f} G"), ("non-emb params", f"{cfg.non_embedding_params() / 1e6:.1f}M"),
            ("warm-up + compile (s)", f"{warm_s:.1f}"),
            ("checkpoint export (s)", f"{export_s:.2f} ({ckpt_mb:.0f} MB)"),
            ("on_checkpoint hook (s)", f"{hook_s:.2f}" + ("" if hook else " (no hook given)")),
            (f"overhead at 1 ckpt / {ckpt_every:,.0f} tok", f"{100 * overhead:.2f}% of training time")]
    if result["peak_memory_gib"] is not None:
        rows.append(("peak GPU memory (GiB)", f"{result['peak_memory_gib']:.1f}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    out = Path(args.out) if args.out else RESULTS / f"train_speed_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
