"""The training loop: one function, `train(cfg)`, readable top to bottom (nanoGPT's train.py shape).

Setup (device, DDP through torchrun, corpus, model, AdamW with µP groups) -> resume from the newest good
checkpoint -> loop (gradient accumulation, clipping, WSD schedule, logging) -> atomic checkpoints every
N tokens, each followed by an optional `on_checkpoint(ckpt_dir)` call (the tracking hook; a hook with a
`model` parameter also gets the in-memory model, see `train`).

Data order is a pure function of (seed, step): micro-batch g of the run takes rows g·B … g·B+B−1 of a
seeded permutation of the train split's windows, so a resumed run and a run on any number of processes
see exactly the same batches as an uninterrupted single-process run.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sparsinglaw import models
from sparsinglaw.console import parse_tokens  # noqa: F401 - part of sparsinglaw.train's API
from sparsinglaw.data import Corpus, get_corpus, n_sequences
from sparsinglaw.errors import UserError
from sparsinglaw.io import append_jsonl, atomic_write_json
from sparsinglaw.train.checkpoint import (
    clean_temp,
    clear_pause_state,
    load_resume_state,
    prune_states,
    write_checkpoint,
    write_pause_state,
)
from sparsinglaw.train.export import save_hf
from sparsinglaw.train.model import ModelConfig, MuPTransformer, padded_vocab
from sparsinglaw.train.presets import get_preset
from sparsinglaw.train.schedule import wsd_lr

PEAK_FLOPS = {"cuda": 989e12}  # H100/H200 dense bf16; MFU is reported against this
# on_checkpoint(ckpt_dir) or on_checkpoint(ckpt_dir, model=MuPTransformer): see `train` and `hook_takes_model`
OnCheckpoint = Callable[..., Any]


@dataclass
class TrainConfig:
    """Everything a run needs. None means: take it from the preset (or a sensible default)."""

    out: str
    tokens: int
    preset: str = "tiny"
    act: str = "relu"
    d_model: int | None = None
    n_layers: int | None = None
    head_dim: int | None = None
    batch_size: int | None = None  # rows per micro-batch per process
    seq_len: int | None = None
    grad_accum: int | None = None  # micro-batches per optimizer step, over all processes
    lr: float | None = None
    warmup: float = 0.01  # fraction of steps
    decay: float = 0.1  # fraction of steps in the final decay
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    ckpt_every: int | None = None  # tokens between checkpoints (linear schedule); default tokens / 20
    ckpt_schedule: str = "linear"  # linear (every ckpt_every tokens) | log (ckpt_count log-spaced steps)
    ckpt_count: int = 24  # checkpoints of the log schedule
    ckpt_first: float = 0.01  # log schedule: the first checkpoint, as a fraction of the run's tokens
    keep_states: int = 2
    eval_tokens: int | None = None  # validation tokens per checkpoint; default min(65536, 8 steps)
    log_every: int = 10
    seed: int = 0
    data: list[str] | None = None
    tokenizer: str | None = None
    vocab_size: int | None = None  # BPE size for a corpus built here; default from the preset
    device: str | None = None
    dtype: str = "auto"  # bf16 autocast on cuda, fp32 elsewhere
    compile: bool | None = None  # default: on for cuda
    save_dtype: str = "float32"
    max_steps: int | None = None  # stop after this many steps, as if interrupted (no final checkpoint)
    progress: bool = True
    report_to: str | None = None  # "tensorboard": also log the scalars to RUN/tensorboard


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    losses: list[float] = field(default_factory=list)  # logged training losses of this call
    val_loss: float | None = None
    checkpoints: list[Path] = field(default_factory=list)
    tokens_per_s: float = 0.0
    stopped: bool = False  # stopped at the deadline before the last step; a paused state was written


# ----------------------------------------------------------------------------------------------------
# Pieces the loop (and benchmarks/train_speed.py) use


class Batches:
    """Deterministic micro-batches from a flat token array: pure function of (seed, index)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int) -> None:
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.n_seq = n_sequences(len(tokens), seq_len)
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_seq))
        return self._perm[1]

    def get(self, index: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for r in range(index * self.batch_size, (index + 1) * self.batch_size):
            start = int(self._order(r // self.n_seq)[r % self.n_seq]) * self.seq_len
            rows.append(np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64))
        xy = torch.from_numpy(np.stack(rows))
        if device.type == "cuda":
            xy = xy.pin_memory().to(device, non_blocking=True)
        else:
            xy = xy.to(device)
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()


def make_optimizer(model: MuPTransformer, lr: float, weight_decay: float, betas: tuple[float, float],
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW over the µP parameter groups; fused kernels on CUDA."""
    extra = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(model.param_groups(lr, weight_decay), lr=lr, betas=betas, **extra)


def autocast_ctx(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype in ("bf16", "bfloat16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def autocast_mode(dtype: str, device: torch.device) -> str:
    """The training precision, bf16 (autocast) or fp32, from a --dtype (`models.resolve_dtype`'s names)."""
    dt = models.resolve_dtype(dtype, device)
    if dt == torch.float16:
        raise UserError("training does not support --dtype fp16; use auto, bf16 or fp32")
    return "bf16" if dt == torch.bfloat16 else "fp32"


def process_device(name: str | None, local_rank: int) -> torch.device:
    """The measuring side's device rules (sparsinglaw.models), plus this process's GPU under torchrun."""
    device = models.resolve_device(name or "auto")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for anything left in fp32
    return device


def model_config(cfg: TrainConfig, vocab_size: int, eos_token_id: int | None) -> ModelConfig:
    p = get_preset(cfg.preset)
    seq_len = cfg.seq_len or p.seq_len
    return ModelConfig(vocab_size=padded_vocab(vocab_size),
                       d_model=cfg.d_model or p.d_model, n_layers=cfg.n_layers or p.n_layers,
                       head_dim=cfg.head_dim or p.head_dim, act=cfg.act, max_seq_len=max(seq_len, 128),
                       eos_token_id=eos_token_id)


@torch.no_grad()
def evaluate(model: torch.nn.Module, corpus: Corpus, seq_len: int, batch_size: int, tokens: int,
             device: torch.device, dtype: str) -> float | None:
    """Mean next-token loss on the first `tokens` tokens of the validation split (full batches only)."""
    val = corpus.tokens("val")
    n_seq = min(n_sequences(len(val), seq_len), max(1, tokens // seq_len))
    n_batches = n_seq // batch_size
    if n_batches == 0:
        return None
    model.eval()
    losses = []
    for b in range(n_batches):
        rows = [np.asarray(val[(b * batch_size + i) * seq_len:(b * batch_size + i) * seq_len + seq_len + 1],
                           dtype=np.int64) for i in range(batch_size)]
        xy = torch.from_numpy(np.stack(rows)).to(device)
        with autocast_ctx(device, dtype):
            losses.append(model(xy[:, :-1], xy[:, 1:]).float())
    model.train()
    return float(torch.stack(losses).mean())


def checkpoint_steps(total_steps: int, schedule: str = "linear", every_steps: int = 1, count: int = 24,
                     first: float = 0.01) -> list[int]:
    """The optimizer steps after which a checkpoint is written; the last step is always one.

    linear: every `every_steps` steps. log: `count` steps log-spaced from `first` x total to total (the
    laws are about log D, so the early, fast-changing part of the curve gets as many points as the late
    part); rounding can merge early steps of a short run, so it may give fewer than `count`.
    """
    if schedule == "linear":
        every = max(1, every_steps)
        return sorted({*range(every, total_steps + 1, every), total_steps})
    if schedule != "log":
        raise UserError(f"unknown checkpoint schedule '{schedule}'; use linear or log")
    if count < 1 or not 0 < first <= 1:
        raise UserError(f"log checkpoints need a count >= 1 and a first fraction in (0, 1] "
                        f"(got {count}, {first:g})")
    start = max(1.0, first * total_steps)
    steps = np.geomspace(start, total_steps, count) if count > 1 else np.array([total_steps])
    return sorted({int(round(s)) for s in steps} | {total_steps})


# ----------------------------------------------------------------------------------------------------
# The run


def _dist_setup() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; initialises the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return rank, local_rank, world


def _check_resume_config(saved: dict, current: dict) -> None:
    for key in ("model", "batch_size", "seq_len", "grad_accum", "seed", "corpus"):
        if saved.get(key) != current.get(key):
            raise UserError(f"--resume with a different {key} than the run was started with "
                            f"({saved.get(key)} vs {current.get(key)}); use the original settings")


def train(cfg: TrainConfig, *, resume: bool = False, on_checkpoint: OnCheckpoint | None = None,  # noqa: C901
          log: Callable[[str], Any] = print, deadline: float | None = None) -> TrainResult:  # (the training loop)
    """Train a model from scratch (or resume) into `cfg.out`; returns what was done.

    `on_checkpoint(ckpt_dir)` runs on rank 0 after each checkpoint is complete on disk (the tracking hook);
    its time is logged as `hook_s`. A hook that takes a keyword `model` (a parameter of that name, or
    **kwargs) is called as `on_checkpoint(ckpt_dir, model=raw)`, where `raw` is the training
    `MuPTransformer` itself (not compiled, not DDP-wrapped, in train mode, on the training device, weights
    equal to the checkpoint's): it may read the weights, e.g. to measure without reloading the checkpoint
    from disk, but must not modify them. Plain `on_checkpoint(path)` callables get the path only.
    With torchrun, every process calls `train` with the same config.

    `deadline` (a `time.time()` value): once it has passed, stop at the next step boundary, write a paused
    trainer state (RUN/paused_state.pt, not a checkpoint: the tracked series stays a function of the
    config) and return with `stopped=True`; `resume=True` continues from it exactly.
    """
    rank, local_rank, world = _dist_setup()
    master = rank == 0
    say = log if master else (lambda _msg: None)
    device = process_device(cfg.device, local_rank)
    dtype = autocast_mode(cfg.dtype, device)
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    run_dir = Path(cfg.out)
    preset = get_preset(cfg.preset)
    model_config(cfg, 256, None)  # validate shape and activation before any slow work

    seq_len = cfg.seq_len or preset.seq_len
    batch_size = cfg.batch_size or preset.batch_size
    grad_accum = cfg.grad_accum or preset.grad_accum
    lr = cfg.lr if cfg.lr is not None else preset.lr
    if min(seq_len, batch_size, grad_accum) < 1:
        raise UserError("batch size, sequence length and gradient accumulation must be positive")
    if grad_accum % world:
        raise UserError(f"--grad-accum {grad_accum} must be divisible by the number of processes ({world})")
    accum_local = grad_accum // world
    tokens_per_step = batch_size * seq_len * grad_accum
    total_steps = cfg.tokens // tokens_per_step
    if total_steps < 1:
        raise UserError(f"--tokens {cfg.tokens:,} is fewer than one batch ({tokens_per_step:,} tokens per "
                        "step = batch size x seq len x grad accum)")
    if not resume and master and (run_dir / "checkpoints").is_dir() and any(
            (run_dir / "checkpoints").glob("step-*")):
        raise UserError(f"{run_dir} already holds checkpoints; pass --resume or choose another --out")

    # Corpus: rank 0 builds (or finds) it first, the others then open the cached copy.
    vocab = cfg.vocab_size or preset.vocab_size
    if master:
        corpus = get_corpus(cfg.data, vocab_size=vocab, tokenizer=cfg.tokenizer, log=say)
    if world > 1:
        dist.barrier()
    if not master:
        corpus = get_corpus(cfg.data, vocab_size=vocab, tokenizer=cfg.tokenizer, log=say)
    train_tokens = corpus.tokens("train")
    if n_sequences(len(train_tokens), seq_len) < batch_size:
        raise UserError(f"the corpus has {len(train_tokens):,} training tokens, fewer than one micro-batch "
                        f"({batch_size} x {seq_len + 1}); add text or lower --batch-size / --seq-len")
    tokenizer = corpus.tokenizer() if master else None
    mcfg = model_config(cfg, corpus.vocab_size, corpus.meta.get("eos_token_id"))
    ckpt_every = cfg.ckpt_every or max(tokens_per_step, cfg.tokens // 20)
    ckpt_steps = max(1, round(ckpt_every / tokens_per_step))
    ckpt_at = set(checkpoint_steps(total_steps, cfg.ckpt_schedule, ckpt_steps, cfg.ckpt_count, cfg.ckpt_first))
    warmup = max(1, round(cfg.warmup * total_steps))
    decay = round(cfg.decay * total_steps)
    run_info = {"model": mcfg.to_dict(), "batch_size": batch_size, "seq_len": seq_len,
                "grad_accum": grad_accum, "seed": cfg.seed, "corpus": str(corpus.path),
                "tokens_per_step": tokens_per_step,
                "total_steps": total_steps, "ckpt_steps": ckpt_steps, "ckpt_schedule": cfg.ckpt_schedule,
                "checkpoint_steps": sorted(ckpt_at), "lr": lr, "warmup_steps": warmup,
                "decay_steps": decay, "world_size": world, "dtype": dtype, "device": device.type,
                "non_embedding_params": mcfg.non_embedding_params(), "train": asdict(cfg)}

    # Model and optimizer (seeded identically on every process), then the resume point.
    torch.manual_seed(cfg.seed)
    raw = MuPTransformer(mcfg).to(device)
    opt = make_optimizer(raw, lr, cfg.weight_decay, cfg.betas, device)
    step = 0
    if resume:
        if (run_dir / "config.json").is_file():
            _check_resume_config(json.loads((run_dir / "config.json").read_text()), run_info)
        found = load_resume_state(run_dir, device, say)
        if found is None:
            say(f"no complete checkpoint in {run_dir}; starting from scratch")
        else:
            ck, state = found
            raw.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            step = int(state["step"])
            torch.set_rng_state(state["rng"]["torch"].cpu())
            say(f"resuming from {ck.path.name} (step {step}, {step * tokens_per_step:,} tokens)")
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_temp(run_dir)
        atomic_write_json(run_dir / "config.json", run_info)
        _truncate_log(run_dir / "log.jsonl", step)
    model: torch.nn.Module = torch.compile(raw) if use_compile else raw
    step_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        step_model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)

    batches = Batches(train_tokens, seq_len, batch_size, cfg.seed)
    flops_per_step = mcfg.flops_per_token(seq_len) * tokens_per_step
    peak = PEAK_FLOPS.get(device.type) if dtype == "bf16" else None
    result = TrainResult(run_dir, step, step * tokens_per_step)
    last_steps = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    bar = None
    if master and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, desc=run_dir.name)
    tb = tensorboard_writer(run_dir / "tensorboard") if master and cfg.report_to == "tensorboard" else None
    loss_sum = torch.zeros((), device=device)
    window_steps, window_t, t_run = 0, time.perf_counter(), 0.0
    raw.train()
    while step < last_steps:
        lr_t = wsd_lr(step, total_steps, lr, warmup, decay)
        for g in opt.param_groups:
            g["lr"] = lr_t * g["lr_scale"]
        for a in range(accum_local):
            x, y = batches.get(step * grad_accum + rank * accum_local + a, device)
            sync = a == accum_local - 1
            ctx = step_model.no_sync() if world > 1 and not sync else contextlib.nullcontext()
            with ctx, autocast_ctx(device, dtype):
                loss = step_model(x, y) / accum_local
            with ctx:
                loss.backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1

        is_ckpt = step in ckpt_at
        stop = deadline is not None and step < last_steps and _past(deadline, world, device)
        if step % cfg.log_every == 0 or is_ckpt or step == last_steps or stop:
            if world > 1:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
                loss_sum /= world
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - window_t
            t_run += dt
            loss_val = loss_sum.item() / window_steps
            tps = window_steps * tokens_per_step / dt
            rec = {"step": step, "tokens": step * tokens_per_step, "loss": loss_val, "lr": lr_t,
                   "tokens_per_s": tps, "mfu": flops_per_step * window_steps / dt / peak if peak else None,
                   "time": time.time()}
            result.losses.append(loss_val)
            if master:
                append_jsonl(run_dir / "log.jsonl", rec)
                _tb_scalars(tb, step, {"train/loss": loss_val, "train/lr": lr_t, "perf/tokens_per_s": tps,
                                       "perf/mfu": rec["mfu"]})
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            loss_sum.zero_()
            window_steps = 0
        if is_ckpt:
            ck_path, val = _checkpoint(cfg, run_dir, raw, model, opt, corpus, tokenizer, step,
                                       tokens_per_step, loss_val, seq_len, batch_size, device, dtype, master,
                                       on_checkpoint)
            if master:
                result.checkpoints.append(ck_path)
                result.val_loss = val
                _tb_scalars(tb, step, {"val/loss": val})
            if world > 1:
                dist.barrier()
        if bar is not None:
            bar.update(1)
        window_t = time.perf_counter() if window_steps == 0 else window_t
        if stop:
            if master and not is_ckpt:
                write_pause_state(run_dir, _trainer_state(raw, opt, step, tokens_per_step))
            if world > 1:
                dist.barrier()
            result.stopped = True
            say(f"stopped for time at step {step} of {total_steps}")
            break
    if master and step == total_steps:
        clear_pause_state(run_dir)
    if tb is not None:
        tb.close()
    if bar is not None:
        bar.close()
    if t_run > 0:
        result.tokens_per_s = (step - result.steps) * tokens_per_step / t_run
    result.steps, result.tokens = step, step * tokens_per_step
    return result


def _checkpoint(cfg: TrainConfig, run_dir: Path, raw: MuPTransformer, model: torch.nn.Module,
                opt: torch.optim.Optimizer, corpus: Corpus, tokenizer: Any, step: int, tokens_per_step: int,
                train_loss: float, seq_len: int, batch_size: int, device: torch.device, dtype: str,
                master: bool, on_checkpoint: OnCheckpoint | None) -> tuple[Path | None, float | None]:
    """Evaluate, write the checkpoint atomically, prune old trainer states, call the hook (rank 0)."""
    if not master:
        return None, None
    t0 = time.perf_counter()
    eval_tokens = cfg.eval_tokens or min(65536, 8 * tokens_per_step)
    val = evaluate(model, corpus, seq_len, batch_size, eval_tokens, device, dtype)
    tokens = step * tokens_per_step
    meta = {"step": step, "tokens": tokens, "train_loss": train_loss, "val_loss": val, "act": raw.cfg.act,
            "preset": cfg.preset, "d_model": raw.cfg.d_model, "n_layers": raw.cfg.n_layers,
            "non_embedding_params": raw.cfg.non_embedding_params(), "corpus": str(corpus.path),
            "time": time.time()}
    state = _trainer_state(raw, opt, step, tokens_per_step)
    save_dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                  "bf16": torch.bfloat16, "float16": torch.float16}[cfg.save_dtype]
    path = write_checkpoint(run_dir, step, lambda d: save_hf(raw, d, tokenizer, save_dtype), meta, state)
    prune_states(run_dir, cfg.keep_states)
    t1 = time.perf_counter()
    if on_checkpoint is not None:
        if hook_takes_model(on_checkpoint):
            on_checkpoint(path, model=raw)
        else:
            on_checkpoint(path)
    t2 = time.perf_counter()
    append_jsonl(run_dir / "log.jsonl", {"step": step, "tokens": tokens, "val_loss": val,
                                        "checkpoint": str(path), "checkpoint_s": t1 - t0, "hook_s": t2 - t1,
                                        "time": time.time()})
    return path, val


def _trainer_state(raw: MuPTransformer, opt: torch.optim.Optimizer, step: int, tokens_per_step: int) -> dict:
    """What resuming needs: weights, optimizer, step and the torch RNG (data order is a function of step)."""
    return {"model": raw.state_dict(), "optimizer": opt.state_dict(), "step": step,
            "tokens": step * tokens_per_step, "rng": {"torch": torch.get_rng_state()}}


def tensorboard_writer(log_dir: Path | None) -> Any:
    """A TensorBoard SummaryWriter for `log_dir` (None: only check that tensorboard is installed)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--report-to tensorboard needs the tensorboard package: "
                        "pip install 'sparsinglaw[tensorboard]'") from None
    return SummaryWriter(str(log_dir)) if log_dir is not None else None


def _tb_scalars(tb: Any, step: int, values: dict) -> None:
    if tb is not None:
        for key, value in values.items():
            if value is not None:
                tb.add_scalar(key, value, step)


def _past(deadline: float, world: int, device: torch.device) -> bool:
    """Whether the deadline has passed, agreed by all processes (rank 0's clock decides)."""
    flag = time.time() >= deadline
    if world > 1:
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.broadcast(t, src=0)
        flag = bool(t.item())
    return flag


def hook_takes_model(hook: Callable[..., Any]) -> bool:
    """Whether `hook` accepts a keyword argument `model` (a parameter of that name, or **kwargs)."""
    try:
        params = inspect.signature(hook).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: call them the old way
        return False
    return any(p.kind is p.VAR_KEYWORD or (p.name == "model" and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                            p.KEYWORD_ONLY))
               for p in params)


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log records past the resume step so the log reads as one uninterrupted run."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    path.write_text("".join(k + "\n" for k in keep))
