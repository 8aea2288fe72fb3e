"""Fixed cost of `sparsinglaw measure`: where the end-to-end time goes besides model loading and the search.

Runs the real command in a fresh interpreter (as a user does) and reads the phase times it records in
measurement.json (imports, data, model load, search, static check, plots, writing); the rest of the wall
time is interpreter start-up and exit. Fixed cost = wall time - model load - search.

  # CPU, a tiny random model (built here, with a BPE tokenizer trained on CPython's prose):
  python benchmarks/cli_overhead.py --device cpu
  # GPU, the paper's 0.1B shape with random weights, CETT-PPL-1% on 64K tokens:
  python benchmarks/cli_overhead.py --random 0.1b --device cuda --tokens 64K --seq-len 2048 --batch-size 8
  # any model folder:
  python benchmarks/cli_overhead.py --model runs/x/checkpoints/step-000500 --device cuda --tokens 64K

Writes benchmarks/results/cli_overhead_<tag>.json (date, git sha, hardware, versions, settings, rows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_model(folder: Path, preset: str | None) -> Path:
    """A random-weight Llama (tiny, or a preset's shape) with a BPE tokenizer, saved as an HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsinglaw.data import read_documents, train_tokenizer

    docs = read_documents(None)  # the default evaluation text: CPython's English prose
    tok = train_tokenizer(docs, 4096)
    if preset:
        from sparsinglaw.train.presets import get_preset

        pr = get_preset(preset)
        width, depth, heads = pr.d_model, pr.n_layers, pr.d_model // pr.head_dim
    else:
        width, depth, heads = 64, 2, 4
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=int(2.5 * width),
                      num_hidden_layers=depth, num_attention_heads=heads, num_key_value_heads=heads,
                      hidden_act="relu", max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run_once(args, model: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "sparsinglaw", "measure", "--model", str(model), "--device", args.device,
           "--tokens", args.tokens, "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--p", str(args.p), "--search", args.search, "--out", str(out), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode not in (0, 3):
        raise SystemExit(f"measure failed ({r.returncode}):\n{r.stderr[-2000:]}")
    meas = json.loads((out / "measurement.json").read_text())
    phases = meas["timings"]["phases"]
    fixed = wall - phases.get("model load", 0.0) - phases.get("search", 0.0)
    return {"wall_s": wall, "phases_s": phases, "fixed_s": fixed,
            "unaccounted_s": wall - sum(phases.values()), "threads": meas["timings"].get("threads"),
            "tau": meas["cett"], "ppl_ratio": meas["ppl_ratio"], "activation_ratio": meas["activation_ratio"],
            "reached": meas.get("reached"), "exit": r.returncode, "closing": r.stdout.strip().splitlines()[-1]}


def hardware() -> dict:
    import torch

    hw = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                hw["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
    return hw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder (default: a random model built here)")
    ap.add_argument("--random", default=None, help="preset shape of the random model (e.g. 0.1b; default tiny)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", default="8K")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--p", type=float, default=1.0)
    ap.add_argument("--search", default="fast")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else build_model(Path(tmp) / "model", args.random)
        rows = [run_once(args, model, Path(tmp) / f"out{i}") for i in range(args.repeats)]
    best = min(rows, key=lambda r: r["wall_s"])
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    tag = args.tag or f"{args.device}_{args.random or ('tiny' if not args.model else Path(args.model).name)}"
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git_sha": sha,
              "hardware": hardware(), "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                                   "transformers": transformers.__version__},
              "settings": {k: v for k, v in vars(args).items()}, "rows": rows,
              "best": {"wall_s": best["wall_s"], "fixed_s": best["fixed_s"], "phases_s": best["phases_s"]}}
    path = ROOT / "benchmarks" / "results" / f"cli_overhead_{tag}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'run':>3} {'wall':>6} {'fixed':>6}  phases (s)")
    for i, r in enumerate(rows):
        print(f"{i:>3} {r['wall_s']:>6.2f} {r['fixed_s']:>6.2f}  "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["phases_s"].items())
              + f", unaccounted {r['unaccounted_s']:.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
