"""Warmup-stable-decay learning-rate schedule (MiniCPM's WSD)."""

from __future__ import annotations


def wsd_lr(step: int, total: int, peak: float, warmup: int, decay: int, final_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`.

    Linear warmup over `warmup` steps, constant `peak`, then an exponential decay over the last `decay`
    steps that reaches `final_ratio`·peak at the end (MiniCPM decays exponentially; a short decay phase
    recovers most of the loss gap to cosine while keeping stable-phase checkpoints reusable).
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    start = total - decay
    if decay <= 0 or step < start:
        return peak
    return peak * final_ratio ** ((step - start + 1) / decay)
