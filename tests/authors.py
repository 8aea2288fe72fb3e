"""An independent implementation of the authors' CETT-PPL-p% procedure, for checking ours against.

Written from the published description only (docs/cett-ppl-search.md, "What is the authors'"), for
Llama-family Hugging Face models: it shares nothing with sparsinglaw but the model and the token batches.
Plain forward hooks on each layer's `mlp.down_proj` capture or mask its input h.

- per layer: norm = |h| * ||W_down[:, i]|| (tokens x d_f, row-major); candidates = 65,536 points from
  norm.min() to `norm.view(-1)[::max(norm.numel() // 65536, 1)].quantile(0.99)`; bisection over candidate
  indices; CETT at a candidate t = mean over tokens of ||W_down (h masked to norm <= t)|| / ||W_down h||;
  the answer is the candidate just below the first whose CETT exceeds tau (index -1 wraps to the last);
- the sparse pass drops neuron i where |h_i| < t / ||W_down[:, i]||, in the model's dtype;
- F = mean over batches of exp(loss_sparse - loss_dense); bisection on tau in [0, 1] until hi - lo <= tol,
  then tau = (lo + hi) / 2 evaluated once more.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

N = 65536


def _downs(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [layer.mlp.down_proj for layer in model.model.layers]


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


@torch.no_grad()
def dense(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    """The dense loss and each layer's down-projection input (tokens x d_f)."""
    hs: list[torch.Tensor] = []
    hooks = [d.register_forward_pre_hook(lambda _m, args: hs.append(args[0].reshape(-1, args[0].shape[-1])))
             for d in _downs(model)]
    try:
        loss = _loss(model, ids)
    finally:
        for hk in hooks:
            hk.remove()
    return loss, hs


@torch.no_grad()
def layer_threshold(h: torch.Tensor, w: torch.Tensor, tau: float) -> float:
    """One layer's threshold (w: the down projection's weight, d_h x d_f)."""
    col = w.float().norm(dim=0)
    norm = h.abs().float() * col
    top = norm.view(-1)[::max(norm.numel() // N, 1)].quantile(0.99)
    cand = torch.linspace(norm.min().item(), top.item(), N)
    y = (h @ w.t()).float().norm(dim=-1)
    lo, hi = 0, N - 1
    while lo < hi:
        mid = (lo + hi) // 2
        e = ((h * (norm <= cand[mid]).to(h.dtype)) @ w.t()).float().norm(dim=-1) / y
        if e.mean().item() > tau:
            hi = mid
        else:
            lo = mid + 1
    return cand[lo - 1].item()


@torch.no_grad()
def sparse(model: torch.nn.Module, ids: torch.Tensor, thresholds: list[float]) -> tuple[float, float]:
    """(loss, activation ratio) with each layer's neurons dropped where |h| < t / ||W_down[:, i]||."""
    kept: list[float] = []

    def hook(t: float, w: torch.Tensor):
        limit = torch.tensor(t, dtype=w.dtype) / w.norm(dim=0).to(w.dtype)  # in the model's dtype

        def pre(_m, args):
            h = args[0]
            keep = h.abs() >= limit
            kept.append(keep.float().mean().item())
            return (h * keep.to(h.dtype),)
        return pre

    hooks = [d.register_forward_pre_hook(hook(t, d.weight.float())) for d, t in zip(_downs(model), thresholds)]
    try:
        loss = _loss(model, ids)
    finally:
        for hk in hooks:
            hk.remove()
    return loss, sum(kept) / len(kept)


def evaluate(model: torch.nn.Module, batches: list[torch.Tensor], tau: float) -> dict:
    """One round at tau: every batch's dense pass, thresholds and sparse pass."""
    ratios, acts, ths = [], [], []
    for ids in batches:
        ld, hs = dense(model, ids)
        th = [layer_threshold(h, d.weight, tau) for h, d in zip(hs, _downs(model))]
        ls, act = sparse(model, ids, th)
        ratios.append(math.exp(ls - ld))
        acts.append(act)
        ths.append(th)
    return {"tau": tau, "ppl_ratio": sum(ratios) / len(ratios), "activation_ratio": sum(acts) / len(acts),
            "thresholds": ths}


def cett_ppl(model: torch.nn.Module, batches: list[torch.Tensor], p: float, tol: float) -> list[dict]:
    """Every round of the bisection on tau, the last one the answer (the final midpoint)."""
    target = 1 + p / 100
    lo, hi, out = 0.0, 1.0, []
    while hi - lo > tol:
        out.append(evaluate(model, batches, (lo + hi) / 2))
        if out[-1]["ppl_ratio"] > target:
            hi = out[-1]["tau"]
        else:
            lo = out[-1]["tau"]
    out.append(evaluate(model, batches, (lo + hi) / 2))
    return out
