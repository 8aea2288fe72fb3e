"""CETT-PPL-p% search speed: fast versus the authors' reference search on the same model and tokens.

Reports wall time, forward passes, tau, activation ratio, realised PPL ratio and peak device memory,
and (with --memory) the fast search's peak GPU memory at several evaluation-token counts.

  # a trained checkpoint (answer check) on the GPU, 64K tokens:
  python benchmarks/measure_speed.py --model runs/x/checkpoints/step-000500 --data DIR --tokens 65536 \
      --seq-len 2048 --batch-size 8 --device cuda --runs fast,ref1e-6,ref1e-3 --variant 0.1b_trained
  # the paper's 1.2B configuration with random weights: timing and memory at 64K and 1M tokens
  python benchmarks/measure_speed.py --config 1.2b --random-tokens --runs fast,ref1e-3 --memory 65536,1048576
  # this CPU: SmolLM2-135M, 8K tokens
  python benchmarks/measure_speed.py --model smollm2-135m --tokens 8192 --device cpu --runs fast

Writes benchmarks/results/measure_speed_<card>_<variant>.json (benchmarks/record.py) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import record
import torch

from sparsinglaw.backend import Backend, using
from sparsinglaw.search import fast_search, reference_search
from sparsinglaw.sparse import Model

PAPER_VOCAB = 122_753


def build_random(config: str, device: torch.device, dtype: torch.dtype):
    """The paper's shape (its 0.1B-2.4B presets) as a Llama model with random weights (times passes only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsinglaw.train.presets import get_preset

    pr = get_preset(config)
    cfg = LlamaConfig(vocab_size=PAPER_VOCAB, hidden_size=pr.d_model, intermediate_size=int(2.5 * pr.d_model),
                      num_hidden_layers=pr.n_layers, num_attention_heads=pr.d_model // pr.head_dim,
                      num_key_value_heads=pr.d_model // pr.head_dim, hidden_act="silu", max_position_embeddings=8192,
                      tie_word_embeddings=True, rms_norm_eps=1e-5)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval(), f"random {config} (d_h {pr.d_model}, L {pr.n_layers}, vocab {PAPER_VOCAB})"


def batches_for(args, tokenizer, vocab: int, tokens: int) -> list[torch.Tensor]:
    if args.random_tokens or tokenizer is None:
        g = torch.Generator().manual_seed(0)
        flat = torch.randint(0, vocab, (tokens // args.seq_len, args.seq_len), generator=g)
        return list(flat.split(args.batch_size))
    from sparsinglaw.data import eval_batches

    return eval_batches(tokenizer, args.data, tokens, args.seq_len, args.batch_size)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(kind: str, m: Model, batches, args, device) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    if kind == "fast":
        res = fast_search(m, batches, args.p, calib_tokens=args.calib_tokens, progress=not args.quiet)
    elif kind == "fast-replay":
        res = replay_fast(m, batches, args)
    elif kind.startswith("ref"):
        res = reference_search(m, batches, args.p, tol=float(kind[3:]), progress=not args.quiet)
    else:
        raise SystemExit(f"unknown run {kind!r}; use fast, fast-replay, ref1e-6, ref1e-3")
    sync(device)
    wall = time.perf_counter() - t0
    ev = res.evaluation
    return {"run": kind, "tokens": sum(b.numel() for b in batches), "batches": len(batches), "wall_s": wall,
            "forward_passes": res.forward_passes, "full_passes": res.full_passes, "evaluations": len(res.history),
            "masked_products": res.masked_products, "updated_products": res.updated_products, "tau": res.tau,
            "activation_ratio": ev.activation_ratio,
            "ppl_ratio": ev.ppl_ratio, "target": res.target, "message": res.message,
            "taus": [h["tau"] for h in res.history], "history": res.history, "breakdown_s": res.breakdown,
            "band": res.band.to_json() if res.band is not None else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def spread(rows: list[dict]) -> list[dict]:
    """Per slice with all three runs: how far the fast answer's activation ratio is from the reference's
    (tol 1e-6), next to how far the reference moves between tolerances 1e-3 and 1e-6 (where the PPL
    ratio is flat in tau, the reference's answer itself is only known to about that)."""
    out = []
    for sl in sorted({r["slice"] for r in rows}):
        by = {r["run"]: r["activation_ratio"] for r in rows if r["slice"] == sl}
        if {"fast", "ref1e-6", "ref1e-3"} <= by.keys():
            out.append({"slice": sl, "fast_minus_ref": by["fast"] - by["ref1e-6"],
                        "ref1e-3_minus_ref": by["ref1e-3"] - by["ref1e-6"]})
    return out


def replay_fast(m: Model, batches, args):
    """The fast search's work for a given tau sequence (e.g. the one it took on a trained model of the same
    family): random weights never reach +p% PPL, so the real search would stop early and time too little."""
    from sparsinglaw import search as s

    taus = [float(x) for x in args.replay_taus.split(",")]
    counter = s.PassCounter(len(batches))
    t0 = time.perf_counter()
    engine = s.FastSearch(m, batches, "all", counter)
    history = []
    for tau in taus:
        ev = engine.evaluate(tau, lockstep=True)
        history.append(ev.brief())
    return s.SearchResult("fast-replay", taus[-1], 1 + args.p / 100, ev, history, counter.passes,
                          counter.passes / len(batches), counter.products, time.perf_counter() - t0,
                          f"replayed taus {taus}", breakdown=counter.seconds, updated_products=counter.updates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder / built-in name (a trained model: the answer check)")
    ap.add_argument("--config", help="paper preset with random weights (0.1b, 1.2b, ...): timing and memory")
    ap.add_argument("--data", default=None, help="text source for --model (default: CPython's prose)")
    ap.add_argument("--random-tokens", action="store_true", help="uniform random token ids instead of text")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--slices", type=int, default=1,
                    help="repeat every run on this many disjoint --tokens slices of the data (the spread of the "
                         "speed-up and of the answer's agreement, one model load)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--p", type=float, default=1.0)
    ap.add_argument("--runs", default="fast,ref1e-6,ref1e-3")
    ap.add_argument("--memory", default="", help="comma list of token counts for the fast search's peak memory")
    ap.add_argument("--replay-taus", default="0.1,0.2,0.17,0.175,0.1745,0.17452",
                    help="tau sequence for the fast-replay run")
    ap.add_argument("--calib-tokens", type=int, default=None, help="fast search's dense-intermediate budget")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--variant", default=None, help="result file suffix after the card (default: the model)")
    ap.add_argument("--backend", default="", help="performance switches, as `sparsinglaw measure --backend`")
    ap.add_argument("--out", default=None, help="also copy the JSON here (a folder)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--no-cudnn-sdpa", action="store_true",
                    help="attention through PyTorch's flash kernel instead of cuDNN's: the same model with "
                         "different rounding, to see how far the answer moves on rounding alone")
    args = ap.parse_args()
    with using(Backend.parse(args.backend)):
        run(args)


def run(args) -> None:
    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)

    from sparsinglaw.models import load_model, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.model:
        lm = load_model(args.model, device=str(device), dtype=args.dtype)
        model, tokenizer, label = lm.model, lm.tokenizer, lm.name
    else:
        model, label = build_random(args.config or "0.1b", device, dtype)
        tokenizer = None
    vocab = model.config.vocab_size
    m = Model(model)
    rows = []
    every = batches_for(args, tokenizer, vocab, args.tokens * args.slices)
    per = len(every) // args.slices
    if args.slices > 1 and (per == 0 or sum(b.numel() for b in every) < args.tokens * args.slices):
        raise SystemExit(f"the data holds {sum(b.numel() for b in every)} tokens, fewer than --slices "
                         f"{args.slices} x --tokens {args.tokens}")
    # warm-up: kernels, allocator
    fast_search(m, every[:1], args.p, progress=False) if device.type == "cuda" else None
    for i in range(args.slices):
        batches = every[i * per:(i + 1) * per]
        for kind in [r for r in args.runs.split(",") if r]:
            rows.append({**run_one(kind, m, batches, args, device), "slice": i})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    memory = []
    for n in [int(x) for x in args.memory.split(",") if x]:
        memory.append(run_one("fast", m, batches_for(args, tokenizer, vocab, n), args, device))
        print(json.dumps(memory[-1]), file=sys.stderr, flush=True)

    for r in rows:
        fast = next((f for f in rows if f["run"] == "fast" and f["slice"] == r["slice"]), None)
        r["speedup_of_fast"] = r["wall_s"] / fast["wall_s"] if fast else None
        r["activation_ratio_minus_fast"] = r["activation_ratio"] - fast["activation_ratio"] if fast else None
    agreement = spread(rows)
    print(f"\n{label} on {device} ({dtype}), p = {args.p}%")
    print(f"{'slice':<6}{'run':<9}{'tokens':>9}{'wall s':>9}{'passes':>8}{'evals':>6}{'tau':>11}{'act.ratio':>10}"
          f"{'- fast':>8}{'PPL ratio':>10}{'peak GiB':>9}{'fast x':>8}")
    for r in rows + memory:
        peak = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
        sp = f"{r.get('speedup_of_fast'):.1f}" if r.get("speedup_of_fast") else "-"
        da = f"{r['activation_ratio_minus_fast']:+.4f}" if r.get("activation_ratio_minus_fast") is not None else "-"
        print(f"{r.get('slice', '-')!s:<6}{r['run']:<9}{r['tokens']:>9}{r['wall_s']:>9.2f}{r['forward_passes']:>8}"
              f"{r['evaluations']:>6}{r['tau']:>11.6f}{r['activation_ratio']:>10.4f}{da:>8}{r['ppl_ratio']:>10.5f}"
              f"{peak:>9}{sp:>8}")
    for a in agreement:
        print(f"slice {a['slice']}: activation ratio fast - ref1e-6 {a['fast_minus_ref']:+.4f}; the reference's own "
              f"spread, ref1e-3 - ref1e-6, {a['ref1e-3_minus_ref']:+.4f}")
    variant = args.variant or (args.config or Path(label).name).replace("/", "_")
    record.write("measure_speed", rows, device, variant, args.out, model=label, dtype=str(dtype),
                 seq_len=args.seq_len, batch_size=args.batch_size, p=args.p, calib_tokens=args.calib_tokens,
                 cudnn_sdpa=not args.no_cudnn_sdpa, memory=memory, agreement=agreement)


if __name__ == "__main__":
    main()
