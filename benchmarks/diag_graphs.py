"""Why graphed CETT passes differ from eager ones (a GPU diagnostic; `bash benchmarks/run_h200.sh graphs`).

For a tiny Llama and GPT-2: graphed against eager passes under each SDPA backend, with and without making
transformers take its eager mask decision while capturing (`is_cuda_stream_capturing` -> False); then an
eager 0.1B-shaped pass timed under each backend. Prints one JSON line per case, writes
$OUT/diag_graphs.json.

Measured on the H200 (torch 2.11, transformers 5.17; benchmarks/results/diag_graphs_h200.json): graphed
Llama passes differ from eager ones alike under flash, memory-efficient and cuDNN attention (loss by
3.6e-4, 2 pairs) and not at all under math attention; with the patch, capture fails on every backend
(Llama: an invalidated capture; GPT-2: a CPU-to-GPU copy), because transformers then checks the mask
on the host. The fix that followed (`sparse.causal_attention`: SDPA under a name transformers builds no
mask for, so it attends through is_causal, captured or not) runs inside every pass since, so a re-run
measures passes with it on; tests/test_graphs.py now asserts bit-identity (13 passed on the H200).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback

import torch
import transformers.utils.import_utils as iu
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))
from tiny import tiny_model  # noqa: E402

from sparsinglaw.sparse import Model, Rule, run_pass  # noqa: E402

BACKENDS = {"default": None, "flash+eff+math": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                   SDPBackend.MATH],
            "cudnn": [SDPBackend.CUDNN_ATTENTION], "math": [SDPBackend.MATH]}


def backend(name: str):
    """SDPA restricted to the named backends (`default`: PyTorch's own choice)."""
    return sdpa_kernel(BACKENDS[name]) if BACKENDS[name] else contextlib.nullcontext()


@contextlib.contextmanager
def eager():
    """Passes run without CUDA graphs inside this block."""
    os.environ["SPARSINGLAW_CUDA_GRAPHS"] = "0"
    try:
        yield
    finally:
        os.environ.pop("SPARSINGLAW_CUDA_GRAPHS")


@contextlib.contextmanager
def capture_patch(on: bool):
    orig = iu.is_cuda_stream_capturing
    if on:
        iu.is_cuda_stream_capturing = lambda: False
    try:
        yield
    finally:
        iu.is_cuda_stream_capturing = orig


def run(family: str, backend_name: str, patch: bool) -> dict:
    model = tiny_model(family).cuda().to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (2, 32), generator=gen).cuda() for _ in range(3)]
    ths = [torch.full((Model(model).n_layers,), v, device="cuda") for v in (0.01, 0.05, 0.2)]
    runs = [(ids, th) for th in ths for ids in batches]
    out = {"family": family, "backend": backend_name, "patch": patch}
    try:
        with backend(backend_name), capture_patch(patch):
            m = Model(model)
            g = [run_pass(m, ids, Rule("cett", thresholds=th), "all", detail=True) for ids, th in runs]
            out["graphs_failed"] = m.graphs_failed
            with eager():
                e = [run_pass(Model(model), ids, Rule("cett", thresholds=th), "all", detail=True)
                     for ids, th in runs]
        out["max_dloss"] = max(abs(a.loss - b.loss) for a, b in zip(g, e))
        out["max_dkept"] = max(float((a.kept - b.kept).abs().max()) for a, b in zip(g, e))
    except Exception as ex:  # noqa: BLE001
        out["error"] = f"{type(ex).__name__}: {ex}"[:400]
        out["trace"] = traceback.format_exc()[-1500:]
    print(json.dumps({k: v for k, v in out.items() if k != "trace"}), flush=True)
    return out


def timing() -> list[dict]:
    """Eager 0.1B-shaped pass (16K tokens): cuDNN (the default) against flash attention."""
    from measure_speed import build_random  # noqa: PLC0415
    from profile_gpu import timed  # noqa: PLC0415
    rows = []
    try:
        model, _ = build_random("0.1b", torch.device("cuda"), torch.bfloat16)
    except Exception as ex:  # noqa: BLE001
        return [{"error": f"{type(ex).__name__}: {ex}"[:300]}]
    ids = torch.randint(0, model.config.vocab_size, (8, 2048), device="cuda")
    m = Model(model)
    th = torch.full((m.n_layers,), 0.05, device="cuda")
    for name in ("default", "flash+eff+math", "cudnn"):
        with backend(name), eager():
            def one():
                run_pass(m, ids, Rule("cett", thresholds=th), "all")
            one()
            one()  # two warm-up passes, then timed's own and ten timed ones
            ms = timed(one, n=10)
        rows.append({"backend": name, "eager_pass_ms": ms})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    res = [run(f, b, p) for f in ("llama", "gpt2") for b in ("default", "flash+eff+math", "cudnn", "math")
           for p in (False, True)]
    res.append({"timing": timing()})
    out = os.environ.get("OUT", "/tmp")
    with open(os.path.join(out, "diag_graphs.json"), "w") as f:
        json.dump(res, f, indent=1)
