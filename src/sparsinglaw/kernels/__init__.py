"""Optional GPU kernels (Triton). Imported lazily: the package never needs Triton to run.

Each kernel has an on/off field in `sparsinglaw.backend.Backend` (all on by default) and serves a tensor
only where `serves` says so: Triton importable, its switch on, and the tensor on a GPU (or Triton's
interpreter on, for CPU tests). Elsewhere its caller takes the torch path.
"""

from __future__ import annotations

import functools

import torch

from sparsinglaw.backend import current


@functools.cache
def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def switched_on(switch: str) -> bool:
    """The kernel behind `switch` (a `Backend` field) is importable and switched on."""
    return has_triton() and getattr(current(), switch)


def serves(x: torch.Tensor, switch: str, *others: torch.Tensor) -> bool:
    """The kernel behind `switch` runs on `x`: switched on, x on a GPU or Triton's interpreter on, and no
    gradient wanted through x or `others` (the kernels have no backward: autograd takes the torch path)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *others)):
        return False
    return switched_on(switch) and (x.is_cuda or current().interpret)
