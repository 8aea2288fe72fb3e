"""Where the time goes: per-phase timings and top CUDA kernels of the fast search's pieces and of a training step.

    python benchmarks/profile_gpu.py measure   # sparse/dense passes, loss, CETT probes (random 0.1B Llama)
    python benchmarks/profile_gpu.py forward   # a sparse pass's kernel time by kind, 0.1B and 1.2B shapes
    python benchmarks/profile_gpu.py train     # one compiled training step of the 0.1b preset
    python benchmarks/profile_gpu.py grids     # a batch's fixed cost before its first probe: DenseLayers.build
                                               #   and the candidate grids, by piece, at the 0.1B shape
    python benchmarks/profile_gpu.py probes    # CETT probes at the 0.1B and 1.2B FFN shapes: the fused
                                               #   probe (both W layouts, with y kept), cuBLAS, sparse updates

A diagnostic, not a target check: it prints tables (and writes JSON to --out) that guide optimisation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from sparsinglaw.backend import current, using


def timed(fn, n: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def top_kernels(fn, rows: int = 18) -> str:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)


def measure_part(out: dict, model_path: str | None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from measure_speed import build_random

    from sparsinglaw.kernels import cett_mask
    from sparsinglaw.metrics import DenseLayers
    from sparsinglaw.sparse import Model, Rule, lm_loss, run_pass

    dev = torch.device("cuda")
    if model_path:
        from sparsinglaw.models import load_model

        model = load_model(model_path, device="cuda", dtype="bf16").model
    else:
        model, _ = build_random("0.1b", dev, torch.bfloat16)
    m = Model(model)
    ids = torch.randint(0, model.config.vocab_size, (8, 2048), device=dev)
    dense = run_pass(m, ids, Rule("dense"), capture=True)
    dl = DenseLayers.build(dense.dense_h, m.w_stack, m.norm_stack)
    th = dl.grids()[:, 3000].contiguous()
    r = {}
    with torch.no_grad():
        r["hf_forward_logits_ms"] = timed(lambda: model(input_ids=ids).logits)
        logits = model(input_ids=ids).logits
        r["lm_loss_ms"] = timed(lambda lg=logits: lm_loss(lg, ids))
        logits = None
        r["run_pass_dense_ms"] = timed(lambda: run_pass(m, ids, Rule("dense")))
        r["run_pass_capture_ms"] = timed(lambda: run_pass(m, ids, Rule("dense"), capture=True))
        r["run_pass_cett_ms"] = timed(lambda: run_pass(m, ids, Rule("cett", thresholds=th)))
        r["run_pass_cett_detail_ms"] = timed(lambda: run_pass(m, ids, Rule("cett", thresholds=th), detail=True))
        # the same pass with the torch mask instead of the fused Triton one (sparsinglaw.kernels.cett_mask),
        # and how far apart the two are: the masks must be identical, so every difference should be 0
        try:
            for positions in ("all", "labeled"):
                with using(replace(current(), fused_mask=False)):
                    if positions == "all":
                        r["run_pass_cett_detail_torchmask_ms"] = timed(
                            lambda: run_pass(m, ids, Rule("cett", thresholds=th), detail=True))
                    plain = run_pass(m, ids, Rule("cett", thresholds=th), positions, detail=True)
                r["fused_mask_enabled"] = cett_mask.enabled(ids)  # False: no Triton here, both were torch
                fused = run_pass(m, ids, Rule("cett", thresholds=th), positions, detail=True)
                r[f"fused_mask_{positions}_loss_abs_diff"] = abs(fused.loss - plain.loss)
                for name in ("kept", "neuron_kept", "token_ratio"):
                    a, b = getattr(fused, name), getattr(plain, name)
                    r[f"fused_mask_{positions}_{name}_max_abs_diff"] = float((a.double() - b.double()).abs().max())
                r[f"fused_mask_{positions}_layer_ratio"] = float(plain.layer_ratio.mean())
        except Exception as e:  # noqa: BLE001 - a diagnostic: report and go on
            r["fused_mask_error"] = f"{type(e).__name__}: {e}"[:300]
        every = torch.arange(dl.n_layers, device=dev)
        for k in (16, 4, 1):
            layers = every[:k]
            r[f"cett_probe_{k}layers_ms"] = timed(lambda layers=layers: dl.cett(layers, th[layers]).tolist())
        r["grids_ms"] = timed(lambda: dl.grids(), n=2)
        # the LM head alone: an odd vocabulary (the paper's 122,753) against the same rows padded to x128
        hid = torch.randn(ids.numel(), model.config.hidden_size, device=dev, dtype=torch.bfloat16)
        w_head = model.get_output_embeddings().weight
        pad = torch.nn.functional.pad(w_head, (0, 0, 0, (-w_head.shape[0]) % 128))
        r["lm_head_matmul_ms"] = timed(lambda: torch.nn.functional.linear(hid, w_head))
        r["lm_head_matmul_padded_ms"] = timed(lambda: torch.nn.functional.linear(hid, pad))
        r["hf_body_no_head_ms"] = timed(lambda: model.model(input_ids=ids).last_hidden_state)
        with using(replace(current(), fused_probe=False)):  # the unfused probe (fp32 a held), for comparison
            dl_plain = DenseLayers.build(dense.dense_h, m.w_stack, m.norm_stack)
        plain = dl_plain.cett(every, th)
        r["cett_probe_16layers_unfused_ms"] = timed(lambda d=dl_plain: d.cett(every, th).tolist())
        if dl.a is None:  # the default fused Triton probe ran above
            fused = dl.cett(every, th)
            r["cett_fused_max_rel_diff"] = float(((fused - plain).abs() / plain.abs().clamp(min=1e-12)).max())
            r["grids_equal"] = bool(torch.equal(dl.grids(), dl_plain.grids()))
        del dl_plain
        r["probe_configs"] = probe_configs(dl.h, dl.norms, dl.w, every, th)
        # the 1.2B FFN shape (d_h 1792, d_f 4480), 4 random layers: the best tile may differ
        g = torch.Generator(device=dev).manual_seed(0)
        h12 = torch.randn(4, ids.numel(), 4480, device=dev, generator=g).to(torch.bfloat16)
        w12 = torch.randn(4, 1792, 4480, device=dev, generator=g).to(torch.bfloat16)
        n12 = w12.float().norm(dim=1)
        a12 = h12[0].abs().float() * n12[0]
        t12 = torch.quantile(a12.flatten()[::97], 0.5).repeat(4)
        r["probe_configs_1.2b_4layers"] = probe_configs(h12, n12, w12, torch.arange(4, device=dev), t12)
        r["probe_cublas_1.2b_4layers"] = probe_cublas(h12, n12, w12, torch.arange(4, device=dev), t12)
    out["measure"] = r
    for k, v in r.items():
        print(f"{k:<28} {v:9.2f}" if isinstance(v, float) and "diff" not in k else f"{k:<28} {v}")
    with torch.no_grad():
        print("== HF forward (logits) ==")
        print(top_kernels(lambda: model(input_ids=ids).logits, rows=25))
        print("== run_pass cett detail ==")
        print(top_kernels(lambda: run_pass(m, ids, Rule("cett", thresholds=th), detail=True), rows=25))
        print("== 16-layer probe ==")
        print(top_kernels(lambda: dl.cett(every, th).tolist()))


def _categories(prof) -> dict:
    """CUDA kernel time (ms) by kind: matmuls, attention, our Triton kernels, everything else."""
    cats: dict[str, float] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", 0.0) / 1e3
        if t <= 0:
            continue
        n = ev.key.lower()
        kind = ("gemm" if any(s in n for s in ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas")) else
                "attention" if any(s in n for s in ("flash", "fmha", "cudnn", "attention")) else
                "triton" if "_kernel" in n and "at::" not in n and "void" not in n else "other")
        cats[kind] = cats.get(kind, 0.0) + t
    return cats


def forward_part(out: dict, configs: list[str]) -> None:
    """Where a sparse pass's time goes on the paper's shapes (vocab 16,384 as our trained runs)."""
    for name in configs:
        out[f"forward_{name}"] = _forward_one(name)
        torch.cuda.empty_cache()


def _forward_one(name: str) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsinglaw.metrics import DenseLayers
    from sparsinglaw.sparse import Model, Rule, run_pass
    from sparsinglaw.train.presets import get_preset

    dev = torch.device("cuda")
    pr = get_preset(name)
    cfg = LlamaConfig(vocab_size=16384, hidden_size=pr.d_model, intermediate_size=int(2.5 * pr.d_model),
                      num_hidden_layers=pr.n_layers, num_attention_heads=pr.d_model // pr.head_dim,
                      num_key_value_heads=pr.d_model // pr.head_dim, hidden_act="silu",
                      max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    m = Model(model)
    ids = torch.randint(0, 16384, (8, 2048), device=dev)
    dense = run_pass(m, ids, Rule("dense"), capture=True)
    th = DenseLayers.build(dense.dense_h, m.w_stack, m.norm_stack).grids()[:, 3000].contiguous()
    del dense
    r: dict = {"hf_forward_ms": timed(lambda: model(input_ids=ids).logits)}

    def sparse():
        return run_pass(m, ids, Rule("cett", thresholds=th), detail=True)

    # the fused RoPE and RMSNorm (sparsinglaw.kernels) off, RoPE alone, both: time, kernels, and outputs
    passes = {}
    for label, rope_on, norm_on in (("plain", False, False), ("rope", True, False), ("rope_norm", True, True)):
        with using(replace(current(), fused_rope=rope_on, fused_norm=norm_on)):
            r[f"capture_ms_{label}"] = timed(lambda: run_pass(m, ids, Rule("dense"), capture=True))
            r[f"cett_detail_ms_{label}"] = timed(sparse)
            passes[label] = sparse()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                sparse()
                torch.cuda.synchronize()
            r[f"kernel_ms_by_kind_{label}"] = _categories(prof)
            if label != "plain":
                print(f"== {name}: run_pass cett detail, {label} ==")
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=70))
    for label in ("rope", "rope_norm"):
        a, b = passes["plain"], passes[label]
        r[f"loss_abs_diff_{label}"] = abs(a.loss - b.loss)
        r[f"kept_max_abs_diff_{label}"] = float((a.kept - b.kept).abs().max())
    print(name, json.dumps(r, indent=1))
    return r

CONFIGS = [(64, 128, 64, 4, 3), (128, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3),
           (128, 256, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 128, 4, 3), (128, 128, 128, 8, 2),
           (256, 128, 64, 8, 3), (64, 64, 64, 4, 4), (128, 256, 32, 8, 4), (64, 128, 32, 4, 4)]


def probe_cublas(h, norms, w, layers, t) -> dict:
    """The alternative to the fused probe at the 1.2B shape: the weak test and masked copy in torch, one
    chunk of tokens at a time (nothing of a's size held), then cuBLAS's bmm and fp32 row norms. Time and
    distance from the fused probe (same (G, m) norms)."""
    from sparsinglaw.kernels import cett_probe

    def norms_cublas(chunk: int = 4096) -> torch.Tensor:
        w_t = w[layers].transpose(1, 2)
        nr, th = norms[layers][:, None, :], t.float()[:, None, None]
        out = []
        for lo in range(0, h.shape[1], chunk):
            hc = h[layers, lo:lo + chunk]
            weak = torch.where(hc.abs().float() * nr <= th, hc, 0)
            out.append(torch.linalg.vector_norm(torch.bmm(weak, w_t), dim=-1, dtype=torch.float32))
        return torch.cat(out, dim=1)

    fused = cett_probe.weak_norms(h, norms, w, layers, t, config=CONFIGS[4])
    got = norms_cublas()
    res = {"ms": timed(norms_cublas), "max_rel_diff": float(((got - fused).abs() / fused.abs().clamp(min=1e-12)).max()),
           "fused_ms": timed(lambda: cett_probe.weak_norms(h, norms, w, layers, t, config=CONFIGS[4]))}
    print(f"probe cublas (1.2B shape, 4 layers) {res}")
    return res


def grids_part(out: dict) -> None:
    """The fixed cost of one batch between its dense pass and its first probe (the search's `grids`
    phase), at the 0.1B FFN shape (16 layers, 16K tokens, d_h 768, d_f 1920) on random h and W: the
    whole of DenseLayers.build and grids(), each piece alone, and the top kernels of both."""
    from sparsinglaw.metrics import DenseLayers, _neuron_norms, _quantile99, _rownorm, grid_stride

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    n_layers, m, d_h, d_f = 16, 16384, 768, 1920
    hs = [(torch.randn(m, d_f, device=dev, generator=g) * torch.rand(1, d_f, device=dev, generator=g)
           ).to(torch.bfloat16) for _ in range(n_layers)]
    w = torch.randn(n_layers, d_h, d_f, device=dev, generator=g).to(torch.bfloat16)
    norms = w.float().norm(dim=1)
    dl = DenseLayers.build(hs, w, norms)
    stride = grid_stride(m * d_f)
    a0 = _neuron_norms(dl.h[0], norms[0]).reshape(1, -1)
    sub = a0[:, ::stride]
    r = {"build_ms": timed(lambda: DenseLayers.build(hs, w, norms)), "grids_ms": timed(dl.grids),
         "stack_ms": timed(lambda: torch.stack(hs)),
         "y_norm_ms": timed(lambda: torch.stack([_rownorm(hi @ wi.t()) for hi, wi in zip(dl.h, dl.w)])),
         "neuron_norms_per_layer_ms": timed(lambda: _neuron_norms(dl.h[0], norms[0])),
         "quantile99_strided_per_layer_ms": timed(lambda s=sub: _quantile99(s)),
         "quantile99_contiguous_per_layer_ms": timed(lambda s=sub.contiguous(): _quantile99(s)),
         "amin_per_layer_ms": timed(lambda a=a0: a.amin()),
         "sort_per_layer_ms": timed(lambda s=sub.contiguous(): s.sort(dim=1)),
         "kthvalue_per_layer_ms": timed(lambda s=sub.contiguous(): s.kthvalue(s.shape[1] // 2, dim=1))}
    del a0, sub
    out["grids"] = r
    print(json.dumps(r, indent=1))
    print("== DenseLayers.build ==")
    print(top_kernels(lambda: DenseLayers.build(hs, w, norms), rows=12))
    print("== grids ==")
    print(top_kernels(dl.grids, rows=12))


def probes_part(out: dict) -> None:
    """One probe per layer at 16K tokens, random h and W, thresholds at the 60% quantile of a: the fused probe
    with W stored d_f-contiguous and d_h-contiguous (as Model.w_stack stores it), with the
    product kept (STORE_Y, for updates), cuBLAS on a masked copy, and sparse updates from the kept product
    to thresholds whose band holds 1e-4 to 3e-2 of h (kernels.cett_update), each against a dense probe."""
    out["probes"] = {name: _probes_one(name, *shape) for name, shape in
                     (("0.1b", (16, 768, 1920)), ("1.2b", (8, 1792, 4480)))}


def _probes_one(name: str, n_layers: int, d_h: int, d_f: int) -> dict:
    from sparsinglaw.kernels import cett_probe, cett_update

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    m = 16384
    h = (torch.randn(n_layers, m, d_f, device=dev, generator=g)
         * torch.rand(n_layers, 1, d_f, device=dev, generator=g)).to(torch.bfloat16)
    w_nk = torch.randn(n_layers, d_h, d_f, device=dev, generator=g).to(torch.bfloat16)
    w_kn = w_nk.transpose(1, 2).contiguous().transpose(1, 2)
    norms = w_nk.float().norm(dim=1)
    layers = torch.arange(n_layers, device=dev)
    a_sub = torch.stack([(h[i].abs().float() * norms[i]).flatten()[::7] for i in range(n_layers)])

    def quantile(q: float) -> torch.Tensor:  # per layer (torch.quantile takes at most 2^24 elements)
        return torch.stack([torch.quantile(row[: 1 << 24], q) for row in a_sub])

    t = quantile(0.6)
    r = {"layers": n_layers, "tokens": m, "d_h": d_h, "d_f": d_f}
    r["fused_nk_ms"] = timed(lambda: cett_probe.weak_norms(h, norms, w_nk, layers, t))
    r["fused_kn_ms"] = timed(lambda: cett_probe.weak_norms(h, norms, w_kn, layers, t))
    y = torch.empty(n_layers, m, d_h, device=dev, dtype=torch.float32)
    r["fused_kn_store_y_ms"] = timed(lambda: cett_probe.weak_norms(h, norms, w_kn, layers, t, y=y))
    base = cett_probe.weak_norms(h, norms, w_kn, layers, t)
    r["layouts_max_rel_diff"] = float(((cett_probe.weak_norms(h, norms, w_nk, layers, t) - base).abs()
                                       / base.clamp(min=1e-12)).max())
    r["cublas"] = probe_cublas(h, norms, w_nk, layers, t)
    for share in (1e-4, 1e-3, 1e-2, 3e-2):
        t2 = quantile(0.6 + share)

        def move(t_from=t, t_to=t2):
            cett_probe.weak_norms(h, norms, w_kn, layers, t_from, y=y)  # y at t_from
            return cett_update.update(y, h, w_kn, layers, t_from, t_to, norms)

        got = move()
        want = cett_probe.weak_norms(h, norms, w_kn, layers, t2)
        ms = timed(move) - r["fused_kn_store_y_ms"]
        r[f"update_{share:g}"] = {"ms": ms, "per_layer_ms": ms / n_layers,
                                  "max_rel_diff": float(((got - want).abs() / want.clamp(min=1e-12)).max())}
        print(f"{name} update share {share:g}: {r[f'update_{share:g}']}")
    r["dense_per_layer_ms"] = r["fused_kn_ms"] / n_layers
    print(name, {k: v for k, v in r.items() if not isinstance(v, dict)})
    return r


def probe_configs(h, norms, w, layers, t) -> dict:
    """Time the fused probe's tile configurations (BM, BN, BK, warps, stages) on one set of probes."""
    from sparsinglaw.kernels import cett_probe

    base = cett_probe.weak_norms(h, norms, w, layers, t, config=CONFIGS[0])
    res = {}
    for c in CONFIGS:
        key = ",".join(map(str, c))
        try:
            got = cett_probe.weak_norms(h, norms, w, layers, t, config=c)
            diff = float(((got - base).abs() / base.abs().clamp(min=1e-12)).max())
            res[key] = {"ms": timed(lambda c=c: cett_probe.weak_norms(h, norms, w, layers, t, config=c)),
                        "max_rel_diff": diff}
        except Exception as e:  # noqa: BLE001 - some tiles do not fit shared memory: report and go on
            res[key] = {"error": f"{type(e).__name__}: {e}"[:200]}
        print(f"probe config {key:<20} {res[key]}")
    return res


def train_part(out: dict, batch: int) -> None:
    from sparsinglaw.train.model import ModelConfig, MuPTransformer
    from sparsinglaw.train.presets import get_preset
    from sparsinglaw.train.trainer import make_optimizer

    dev = torch.device("cuda")
    torch.set_float32_matmul_precision("high")
    pr = get_preset("0.1b")
    cfg = ModelConfig(vocab_size=122753, d_model=pr.d_model, n_layers=pr.n_layers, head_dim=pr.head_dim,
                      act="relu", max_seq_len=2048)
    raw = MuPTransformer(cfg).to(dev)
    opt = make_optimizer(raw, pr.lr, 0.1, (0.9, 0.95), dev)
    model = torch.compile(raw)
    x = torch.randint(0, 122753, (batch, 2048), device=dev)
    y = torch.randint(0, 122753, (batch, 2048), device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    ms = timed(step, n=10)
    tps = batch * 2048 / ms * 1e3
    mfu = cfg.flops_per_token(2048) * tps / 989e12
    out[f"train_b{batch}"] = {"step_ms": ms, "tokens_per_s": tps, "mfu": mfu}
    print(f"train batch {batch}: {ms:.1f} ms/step, {tps:,.0f} tok/s, MFU {100 * mfu:.1f}%")
    if batch == 8:
        print(top_kernels(step, rows=25))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("parts", nargs="+")
    ap.add_argument("--out", default=None)
    ap.add_argument("--model", default=None, help="measure part: a checkpoint (default: random 0.1B, vocab 122,753)")
    args = ap.parse_args()
    out: dict = {}
    for p in args.parts:
        if p == "measure":
            measure_part(out, args.model)
        elif p == "probes":
            probes_part(out)
        elif p == "forward":
            forward_part(out, ["0.1b", "1.2b"])
        elif p.startswith("forward"):  # forward0.1b: one shape
            forward_part(out, [p[7:]])
        elif p == "grids":
            grids_part(out)
        elif p.startswith("train"):
            train_part(out, int(p[5:] or 8))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
