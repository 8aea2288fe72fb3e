"""sparsinglaw: measure, train for, fit and exploit activation sparsity (arXiv 2411.02335).

The public API, importable from here::

    from sparsinglaw import load_model, eval_batches, measure, sparsify

Names are imported on first use, except `measure` and `tradeoff`, which share their module's name: they are
bound here at import, so `sparsinglaw.measure` is always the function (the module is
`sys.modules["sparsinglaw.measure"]`). Training and tracking live in `sparsinglaw.train.train` and
`sparsinglaw.track.track`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "load_model": "models", "fetch": "models",
    "eval_batches": "data", "read_documents": "data",
    "measure": "measure", "tradeoff": "measure", "Measurement": "measure", "Tradeoff": "measure",
    "sparsify": "sparse", "Thresholds": "sparse",
    "fast_search": "search", "reference_search": "search",
    "Backend": "backend", "using": "backend",
    "register": "sites", "Adapter": "sites",
    "OnlineTracker": "track", "SparsityCallback": "track",
    "Series": "laws", "load_series": "laws", "fit_series": "laws", "fit_width_depth": "laws",
    "TrainConfig": "train",
}
__all__ = ["Adapter", "Backend", "Measurement", "OnlineTracker", "Series", "SparsityCallback", "Thresholds",
           "Tradeoff", "TrainConfig", "eval_batches", "fast_search", "fetch", "fit_series", "fit_width_depth",
           "load_model", "load_series", "measure", "read_documents", "reference_search", "register", "sparsify",
           "tradeoff", "using"]


# the submodule is imported (binding its name here) before the function takes that name over
from sparsinglaw.measure import Measurement, Tradeoff, measure, tradeoff  # noqa: E402


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sparsinglaw' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sparsinglaw.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from sparsinglaw.backend import Backend, using
    from sparsinglaw.data import eval_batches, read_documents
    from sparsinglaw.laws import Series, fit_series, fit_width_depth, load_series
    from sparsinglaw.models import fetch, load_model
    from sparsinglaw.search import fast_search, reference_search
    from sparsinglaw.sites import Adapter, register
    from sparsinglaw.sparse import Thresholds, sparsify
    from sparsinglaw.track import OnlineTracker, SparsityCallback
    from sparsinglaw.train import TrainConfig
