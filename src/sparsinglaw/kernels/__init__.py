"""Optional GPU kernels (Triton). Imported lazily: the package never needs Triton to run.

Each kernel module has an on/off switch (an environment variable, on unless set to "0") and serves a
tensor only where `serves` says so: Triton importable, the switch on, and the tensor on a GPU (or
Triton's interpreter on, for CPU tests). Elsewhere its caller takes the torch path.
"""

from __future__ import annotations

import os

import torch


def switched_on(switch: str) -> bool:
    """The kernel behind `switch` is importable and not turned off."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return os.environ.get(switch, "1") != "0"


def serves(x: torch.Tensor, switch: str, *others: torch.Tensor) -> bool:
    """The kernel behind `switch` runs on `x`: switched on, x on a GPU or Triton's interpreter on, and no
    gradient wanted through x or `others` (the kernels have no backward: autograd takes the torch path)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *others)):
        return False
    return switched_on(switch) and (x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1")
