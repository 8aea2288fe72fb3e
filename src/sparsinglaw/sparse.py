"""Forward passes with FFN neurons dropped: the rules, the pass runner, and exported thresholds.

A `Rule` decides, per layer, which neurons a token keeps. `run_pass` runs a batch through the model
with the rule applied at every down projection and returns the loss, kept-neuron counts and (when
asked) each layer's dense h. `Thresholds` is the static, exportable form (thresholds.json) that
`sparsify` installs on any model for evaluation or generation.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsinglaw import metrics, patches
from sparsinglaw.backend import current
from sparsinglaw.errors import UserError
from sparsinglaw.io import atomic_write_json
from sparsinglaw.sites import FFNSite, ffn_sites, hooked

FORMAT = "sparsinglaw-thresholds/1"


@dataclass
class Rule:
    """How neurons are dropped. kind: dense | zero | fat | topk_pooled | topk_token | cett (per-layer
    thresholds on |h_i| * ||W_down[:, i]||) | cett_authors (the same thresholds, the authors' test:
    |h_i| < t / ||W_down[:, i]|| in the model's dtype) | abs (per-layer thresholds on |s_i|)."""

    kind: str
    value: float = 0.0
    thresholds: torch.Tensor | None = None  # (L,) for cett / abs
    recorded: dict[int, list[torch.Tensor]] | None = None  # topk_pooled: each layer's |s| cut, per batch

    @property
    def need_s(self) -> bool:
        return self.kind in ("zero", "fat", "topk_pooled", "topk_token", "abs")

    def keep(self, i: int, h: torch.Tensor, s: torch.Tensor, norms: torch.Tensor) -> torch.Tensor | None:
        if self.kind == "dense":
            return None
        if self.kind == "zero":
            return metrics.keep_zero(s)
        if self.kind == "fat":
            return metrics.keep_fat(s, self.value)
        if self.kind == "topk_pooled":
            cut = metrics.topk_pooled_threshold(s, self.value)
            if self.recorded is not None:
                self.recorded.setdefault(i, []).append(cut)
            return s.abs() >= cut.to(s.dtype)
        if self.kind == "topk_token":
            return metrics.keep_topk_per_token(s, self.value)
        if self.kind == "cett":
            return metrics.keep_cett(h, norms, self.thresholds[i])
        if self.kind == "cett_authors":
            return metrics.keep_cett_authors(h, norms, self.thresholds[i])
        if self.kind == "abs":
            return s.abs() >= self.thresholds[i].to(s.dtype)
        raise ValueError(f"unknown rule {self.kind}")

    def mask(self, i: int, h: torch.Tensor, s: torch.Tensor, norms: torch.Tensor) -> torch.Tensor | None:
        """h with the dropped neurons zeroed (None: dense); CETT through the fused kernel where it runs."""
        from sparsinglaw.kernels import cett_mask  # lazy, as every kernel: Triton is optional

        if self.kind == "cett" and cett_mask.enabled(h):
            return cett_mask.apply(h, norms, self.thresholds[i])[0]
        keep = self.keep(i, h, s, norms)
        return None if keep is None else torch.where(keep, h, 0)


@dataclass
class PassResult:
    loss: float
    kept: torch.Tensor  # (L,) kept (token, neuron) pairs per layer over counted positions
    tokens: int  # counted positions
    d_ff: int
    block_loss: torch.Tensor | None = field(default=None, repr=False)  # `lm_loss`'s block sums, CPU fp64
    block_tokens: torch.Tensor | None = field(default=None, repr=False)  # tokens in each block
    dense_h: list[torch.Tensor] | None = None  # per layer (m, d_f), counted positions only
    neuron_kept: torch.Tensor | None = None  # (L, d_f) times each neuron was kept
    token_ratio: torch.Tensor | None = None  # (L, S) per-token activation ratio of the first sequence

    @property
    def layer_ratio(self) -> torch.Tensor:
        return self.kept.double() / (self.tokens * self.d_ff)


class Model:
    """A causal LM with its FFN sites and column norms, computed once."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.sites: list[FFNSite] = ffn_sites(model)
        self.norms = [s.column_norms().detach() for s in self.sites]
        self.d_ff = self.sites[0].d_ff
        self.device = next(model.parameters()).device
        self._w: torch.Tensor | None = None
        self._graphs: dict[tuple, GraphedPass] = {}
        self.graphs_failed: str | bool = False  # why a capture failed: this model's passes then run eagerly

    @property
    def w_stack(self) -> torch.Tensor:
        """(L, d_h, d_f) down projections, stacked once for batched CETT evaluation. Stored with d_h
        contiguous (a transposed view): a sparse probe update reads one neuron's column of W at a time."""
        if self._w is None:
            self._w = torch.stack([s.down_weight().detach().t() for s in self.sites]).transpose(1, 2)
        return self._w

    def graphed(self, ids: torch.Tensor, rule: Rule, positions: str, detail: bool) -> GraphedPass | None:
        """The CUDA-graphed pass for this batch shape, where graphs serve: CETT rules on a GPU."""
        if (rule.kind != "cett" or not ids.is_cuda or self.graphs_failed
                or not current().cuda_graphs):
            return None
        key = (tuple(ids.shape), positions, detail)
        if key not in self._graphs:
            self._graphs[key] = GraphedPass(self, ids, positions, detail)
        return self._graphs[key]

    @property
    def norm_stack(self) -> torch.Tensor:
        return torch.stack(self.norms)

    @property
    def n_layers(self) -> int:
        return len(self.sites)


def counted_positions(ids: torch.Tensor, positions: str) -> torch.Tensor:
    """Which positions count for activation ratios: 'all', or 'labeled' (those with a next token)."""
    mask = torch.ones_like(ids, dtype=torch.bool)
    if positions == "labeled":
        mask[:, -1] = False
    elif positions != "all":
        raise UserError(f"unknown positions {positions!r}; use all or labeled")
    return mask


BLOCK_TOKENS = 128  # predicted tokens per block: the unit over which the noise of F is bootstrapped


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, chunk: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy in fp32 (a few rows at a time, so the fp32 logits stay small), and
    its fp64 sums over blocks of BLOCK_TOKENS consecutive predicted tokens of each sequence (the last block
    of a sequence shorter; `block_tokens` gives the counts), flattened sequence by sequence: what
    `uncertainty` resamples to measure the noise of the PPL ratio."""
    b, s = ids.shape
    nb = -(-(s - 1) // BLOCK_TOKENS)
    blocks = torch.zeros(b, nb * BLOCK_TOKENS, device=logits.device, dtype=torch.float64)
    for lo in range(0, b, chunk):
        lg = logits[lo:lo + chunk, :-1].float()
        ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[lo:lo + chunk, 1:].reshape(-1), reduction="none")
        blocks[lo:lo + chunk, :s - 1] = ce.view(-1, s - 1)
    blocks = blocks.view(b, nb, BLOCK_TOKENS).sum(-1).flatten()
    return blocks.sum() / (b * (s - 1)), blocks


def block_tokens(ids_shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Predicted tokens in each of `lm_loss`'s blocks for a (sequences x length) batch."""
    b, s = ids_shape
    per_seq = [min(BLOCK_TOKENS, s - 1 - lo) for lo in range(0, s - 1, BLOCK_TOKENS)]
    return torch.tensor(per_seq * b, dtype=torch.float64)


def run_pass(m: Model, ids: torch.Tensor, rule: Rule, positions: str = "all", capture: bool = False,
             detail: bool = False) -> PassResult:
    """One forward pass of a batch with `rule` applied at every FFN; never syncs inside the pass.

    CETT on a GPU goes through one fused Triton kernel per layer (`kernels.cett_mask`,
    `Backend.fused_mask`); elsewhere the torch path below, which keeps the very same neurons.
    On a GPU the Llama family's RoPE and RMSNorm run through fused kernels too (`kernels.rope`,
    bit-identical; `kernels.rmsnorm`, to the last bit of the norm's sum), together a third of a pass,
    and CETT passes of a batch shape seen before replay a CUDA graph of the pass (`GraphedPass`)."""
    return launch_pass(m, ids, rule, positions, capture, detail).result()


@dataclass
class LaunchedPass:
    """A pass queued on the device and not read back yet; `result()` waits for it (one host sync)."""

    loss: torch.Tensor  # still on the device
    pending: PassResult  # everything else (its loss a placeholder until `result()`)
    blocks: torch.Tensor | None = None  # `lm_loss`'s block sums, still on the device

    def result(self) -> PassResult:
        loss = self.loss.item()
        if not math.isfinite(loss):
            raise UserError("the model produced NaN/inf logits; try --dtype fp32 or check the checkpoint")
        return replace(self.pending, loss=loss, block_loss=None if self.blocks is None else self.blocks.cpu())


@torch.no_grad()
def launch_pass(m: Model, ids: torch.Tensor, rule: Rule, positions: str = "all", capture: bool = False,
                detail: bool = False) -> LaunchedPass:
    """`run_pass` up to its one host sync: the host may go on (to work on another stream) while the device
    runs the pass."""
    ids = ids.to(m.device)
    graph = None if capture else m.graphed(ids, rule, positions, detail)
    if graph is not None:
        (loss, blocks), kept, neuron_kept, token_ratio = graph(ids, rule.thresholds)
        captured = None
    else:
        (loss, blocks), kept, neuron_kept, token_ratio, captured = _pass(m, ids, rule, positions, capture, detail)
    pending = PassResult(loss=math.nan, kept=kept, tokens=n_counted(ids, positions), d_ff=m.d_ff,
                         dense_h=captured if capture else None, neuron_kept=neuron_kept, token_ratio=token_ratio,
                         block_tokens=block_tokens(ids.shape))
    return LaunchedPass(loss, pending, blocks)


def n_counted(ids: torch.Tensor, positions: str) -> int:
    """How many positions `counted_positions` counts, from the shape alone (no sync)."""
    return ids.numel() if positions == "all" else ids.shape[0] * (ids.shape[1] - 1)


def _pass(m: Model, ids: torch.Tensor, rule: Rule, positions: str, capture: bool, detail: bool):
    """The pass itself, without a host sync (so that it can be captured in a CUDA graph): device tensors
    ((loss, block sums), kept, neuron_kept, token_ratio) and the captured h of each layer."""
    from sparsinglaw.kernels import cett_mask  # lazy, as every kernel: Triton is optional

    counted = counted_positions(ids, positions).flatten()
    n = n_counted(ids, positions)
    kept = torch.zeros(m.n_layers, device=m.device, dtype=torch.float64)
    neuron_kept = torch.zeros(m.n_layers, m.d_ff, device=m.device, dtype=torch.float64) if detail else None
    token_ratio = torch.zeros(m.n_layers, ids.shape[1], device=m.device) if detail else None
    captured: list[torch.Tensor | None] = [None] * m.n_layers
    seq = ids.shape[1]

    def fn(i: int, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor | None:
        if capture:
            captured[i] = h.reshape(-1, h.shape[-1])[counted] if positions != "all" else h.reshape(-1, h.shape[-1])
        if rule.kind == "cett" and cett_mask.enabled(h):  # one kernel: mask, masked h and both counts
            out, col, rows = cett_mask.apply(h, m.norms[i], rule.thresholds[i],
                                             seq=seq if positions == "labeled" else None,
                                             row_counts=seq if detail else 0)
            kept[i] += col.sum()
            if detail:
                neuron_kept[i] += col
                token_ratio[i] = rows.float() / h.shape[-1]
            return out
        keep = rule.keep(i, h, s, m.norms[i])
        if keep is None:  # dense: every neuron counts as kept
            kept[i] += n * m.d_ff
            if detail:
                neuron_kept[i] += n
                token_ratio[i] = 1.0
            return None
        keep_flat = keep.reshape(-1, keep.shape[-1])
        kc = keep_flat[counted] if positions != "all" else keep_flat
        col = kc.sum(0, dtype=torch.int32)  # one reduction serves both counts
        kept[i] += col.sum()
        if detail:
            neuron_kept[i] += col
            # kept counts over d_f, as the fused path computes them (identical token ratios)
            token_ratio[i] = keep_flat[:seq].sum(-1, dtype=torch.int32).float() / keep.shape[-1]
        return torch.where(keep, h, 0)

    with hooked(m.sites, fn, need_s=rule.need_s), patches.passes(m.model, seq):
        logits = m.model(input_ids=ids, use_cache=False).logits
    return lm_loss(logits, ids), kept, neuron_kept, token_ratio, captured


class GraphedPass:
    """CETT passes of one batch shape as a CUDA graph: the thresholds and token ids are copied into static
    buffers and the recorded kernels replayed, so the host's per-layer Python and launch overhead (a
    third of a 0.1B pass on an H200) is paid once. The first call runs eagerly (compiling kernels), the
    second captures; a pass that cannot be captured (a host sync inside a model's forward) runs eagerly
    from then on. `Backend.cuda_graphs` switches graphs.

    Bit-identical to an eager pass (tests/test_graphs.py): both attend through `patches.causal_attention`.
    Without it, transformers counts stream capture as tracing and builds the causal mask, and SDPA takes
    another, slower kernel whose rounding differs."""

    def __init__(self, m: Model, ids: torch.Tensor, positions: str, detail: bool):
        self.m, self.positions, self.detail = m, positions, detail
        self.ids = torch.empty_like(ids)
        self.th = torch.zeros(m.n_layers, device=m.device, dtype=torch.float32)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: tuple | None = None
        self.calls = 0

    def __call__(self, ids: torch.Tensor, thresholds: torch.Tensor) -> tuple:
        self.ids.copy_(ids)
        self.th.copy_(thresholds)
        self.calls += 1
        if self.graph is None and self.calls >= 2 and not self.m.graphs_failed:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    out = self._pass()
                self.graph, self.out = graph, out
            except Exception as e:  # noqa: BLE001 - anything the capture rejects: run eagerly from now on
                self.m.graphs_failed = f"{type(e).__name__}: {e}"[:300]
                torch.cuda.synchronize()
        if self.graph is None:
            return self._pass()
        self.graph.replay()
        # the graph's outputs are overwritten by the next replay: callers keep copies
        (loss, blocks), *rest = self.out
        return ((loss.clone(), blocks.clone()), *(x.clone() if x is not None else None for x in rest))

    def _pass(self) -> tuple:
        """The pass on the static buffers: ((loss, block sums), kept, neuron_kept, token_ratio) device tensors."""
        return _pass(self.m, self.ids, Rule("cett", thresholds=self.th), self.positions, False, self.detail)[:4]


# --- static thresholds: export, load, apply ---------------------------------------------------------

@dataclass
class Thresholds:
    """Frozen per-layer thresholds for sparse inference (the static regime), saved as thresholds.json.

    kind 'cett': neuron i of layer l is dropped when |h_i| * ||W_down[:, i]|| <= thresholds[l]
    (equivalently |h_i| <= t_l / ||W_down[:, i]||); kind 'abs': dropped when |s_i| < thresholds[l].
    """

    kind: str
    thresholds: list[float]
    model: str = ""
    metric: str = ""
    params: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, {"format": FORMAT, **asdict(self),
                                 "layers": [{"index": i, "threshold": t} for i, t in enumerate(self.thresholds)]})

    @classmethod
    def load(cls, path: str | Path) -> Thresholds:
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"thresholds file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path} is not a thresholds.json written by sparsinglaw") from None
        if d.get("format") != FORMAT or d.get("kind") not in ("cett", "abs"):
            raise UserError(f"{path} is not a thresholds.json written by sparsinglaw (format {FORMAT})")
        return cls(kind=d["kind"], thresholds=[float(x) for x in d["thresholds"]], model=d.get("model", ""),
                   metric=d.get("metric", ""), params=d.get("params", {}))

    def rule(self, device: torch.device | str = "cpu") -> Rule:
        return Rule(self.kind, thresholds=torch.tensor(self.thresholds, dtype=torch.float32, device=device))


@contextlib.contextmanager
def sparsify(model: torch.nn.Module, thresholds: Thresholds | str | Path) -> Iterator[Model]:
    """Run `model` sparsely inside this block (evaluation, `generate`, anything that calls forward)."""
    th = thresholds if isinstance(thresholds, Thresholds) else Thresholds.load(thresholds)
    m = Model(model)
    if len(th.thresholds) != m.n_layers:
        raise UserError(f"thresholds have {len(th.thresholds)} layers but the model has {m.n_layers}")
    rule = th.rule(m.device)

    with hooked(m.sites, lambda i, h, s: rule.mask(i, h, s, m.norms[i]), need_s=rule.need_s), patches.passes(model):
        yield m
