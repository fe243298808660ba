"""Validation-free monitoring of LoRA fine-tuning: CS, CS-Fluctuation and the turning point.

Source: "early-stopping-lora-cs-fluctuation" (../shared/papers), Section 3.2, Eqs. 2-4, Algorithm 1.
Everything here is a pure function over tensors / sequences (no IO, no transport), and works on any
peft-wrapped torch module (a diffusers UNet after `unet.add_adapter(...)`, a CLIP text encoder, an
LLM after `get_peft_model(...)`, or a plain module after `inject_adapter_in_model(...)`).

CS (Eq. 2)
    CS = mean_i cos(vec(B_i A_i), vec(W_i)) over the LoRA-adapted layers i, W_i the frozen weight.
    `CosineSimilarity` never forms B_i A_i (d x k):
        <BA, W>_F  = sum((B^T W) * A) = sum(B * (W A^T))   (W A^T: a d x r product, reads W once)
        ||BA||_F^2 = sum((B^T B) * (A A^T))        (two r x r Gram matrices)
    and ||W_i|| is computed once. It runs under no_grad, in float32 whatever the weights' dtype, and
    synchronises once (one `.item()`) per call. Conventions:
    - peft's `scaling` (alpha / r, or alpha / sqrt(r)) is a positive factor: it does not change a
      cosine, so it is ignored (CS is the cosine of B A, as in the paper).
    - A layer whose B A is exactly zero (B = 0 at peft's default init) has an undefined 0/0 cosine;
      we define its CS as 0 (no direction yet). A zero frozen weight likewise gives 0.
    - Layer shapes: Linear (W: d x k); Conv (1x1, or k x k with peft's 1x1 lora_B: B A is defined
      by flattening A and W to r x (in*kh*kw) and d x (in*kh*kw), which is exactly what peft's
      get_delta_weight computes); Embedding and fan_in_fan_out Linear (GPT-2 Conv1D), whose frozen
      weight is stored transposed relative to B A. Skipped, with a warning naming the layer and the
      reason: grouped convolutions, quantized / non-floating base weights, layers whose adapter is
      merged into W, and peft layer types other than the above.

CS-Fluctuation (Eqs. 3-4), index alignment
    With M the window and the paper's forward windows "sum_{j}^{j+M}" read as the M values j..j+M-1:
        A_j   = mean(CS_j .. CS_{j+M-1})                        (Eq. 3, MA)
        dA_j  = A_j - A_{j-1}                                    (slope, first difference)
        X_j   = mean(dA_j .. dA_{j+M-1})                         (smoothed slope)
        CSF_j = (1/lr_j) * mean_{i=j..j+M-1} (X_i - mean(X_j..X_{j+M-1}))^2      (Eq. 4)
    CSF_j is indexed, as in the paper, at the first step of its windows: it depends on
    CS_{j-1} .. CS_{j+3M-3}, so it becomes known at step j + 3M - 3 (the paper's Algorithm 1 writes
    a lag of M, which counts one window; three nested forward windows of M values lag 3(M-1)).
    `lr_j` is the learning rate at step j (the index step); CSF_j is None where lr_j <= 0.
    The turning point is reported at that index step: the returned weights are those at the start
    of the calm window, as in the paper ("the checkpoint at the turning-point epoch").

Turning point (Algorithm 1, second valley) and its noise guard
    `TurningPointDetector` runs on the full-resolution CSF series and is a hysteresis ("zig-zag")
    valley/peak tracker:
    - A valley is the lowest point v of a descent (the curve fell more than `thr` into it) that is
      followed, within `horizon` steps, by a rise of more than `thr` above it, where
      thr = min_rise * (max - min of CSF seen so far). Peaks are confirmed symmetrically (a fall of
      more than `thr` below the highest point since the last valley); valleys and peaks alternate.
      With min_rise = 0 this is "the derivative turns from - to +" exactly; a bump smaller than
      `thr` never makes a valley.
    - A valley closer than `min_valley_distance` steps (default: window) to the previous one is
      merged into it (the lower of the two is kept) and is not counted. So that a merge can still
      move it, the second valley becomes final only when no valley closer than that can still be
      confirmed (at the latest `min_valley_distance + horizon` CSF steps after it).
    - A candidate whose rise does not come within `horizon` steps (default 4 * window) is not a
      turn but a plateau; the search restarts after it. This bounds the lag.
    - The turning point is the second (merged) valley, snapped to the nearest window boundary
      (steps that are multiples of `window`, ties to the earlier one, never before the first step
      seen), because the trainer keeps weight snapshots only at window boundaries; the snap moves it
      by at most window // 2 steps.
    Lag: the turning point b is returned by `update` at a step t with
        t - b <= max_lag = horizon + min_valley_distance + 3 * (window - 1) + window // 2
    (8.5 * window - 3 with the defaults), so a trainer that keeps the boundary snapshots of the last
    `max_lag` steps (SnapshotKeeper.drop_before(detector.oldest_needed_step(step))) always holds the
    weights of the turning point: at most max_lag // window + 1 snapshots (9 with the defaults),
    plus the turning point's own once found (SnapshotKeeper.pin).
    Until it is final, `pending_turning_point` gives the current candidate (e.g. when training ends).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------
# LoRA layers


@dataclass(frozen=True)
class LoraPair:
    """One LoRA-adapted layer: live references to its factors and its frozen weight.

    `b2d()` (d x r), `a2d()` (r x k) and `w2d()` (d x k) are views such that B A has W's layout.
    """

    name: str
    layer: nn.Module
    a: Tensor  # peft's lora_A weight (r x k, or r x in x kh x kw) or lora_embedding_A (r x num_embeddings)
    b: Tensor  # peft's lora_B weight (d x r, or d x r x 1 x 1) or lora_embedding_B (dim x r)
    w: Tensor  # the frozen base weight, as stored
    kind: str  # "linear" | "conv" | "embedding"
    w_transposed: bool  # W is stored as (B A)^T (embedding, fan_in_fan_out)
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def a2d(self) -> Tensor:
        return self.a.reshape(self.a.shape[0], -1)

    def b2d(self) -> Tensor:
        return self.b.reshape(self.b.shape[0], -1)

    def w2d(self) -> Tensor:
        w = self.w.reshape(self.w.shape[0], -1)
        return w.T if self.w_transposed else w


def _classify(name: str, layer: nn.Module, adapter: str) -> LoraPair | str | None:
    """A LoraPair, a reason to skip the layer, or None when the layer lacks this adapter."""
    from peft.tuners.lora import layer as peft_lora

    if adapter in getattr(layer, "merged_adapters", []):
        return "adapter merged into the base weight (W is not the frozen weight)"
    scaling = (
        float(layer.scaling.get(adapter, 1.0)) if isinstance(getattr(layer, "scaling", None), dict) else 1.0
    )
    try:
        base = layer.get_base_layer()
    except Exception:  # pragma: no cover - exotic wrappers
        base = getattr(layer, "base_layer", None)
    w = getattr(base, "weight", None)
    if isinstance(layer, peft_lora.Embedding):
        if adapter not in layer.lora_embedding_A:
            return None
        kind, a, b, transposed = (
            "embedding",
            layer.lora_embedding_A[adapter],
            layer.lora_embedding_B[adapter],
            True,
        )
    elif isinstance(layer, peft_lora.Linear):
        if adapter not in layer.lora_A:
            return None
        kind, transposed = "linear", bool(getattr(layer, "fan_in_fan_out", False))
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    elif isinstance(layer, peft_lora._ConvNd):
        if adapter not in layer.lora_A:
            return None
        kind, transposed = "conv", False
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        if getattr(base, "groups", 1) != 1:
            return f"grouped convolution (groups={base.groups}): B A is not a plain product"
        if any(s != 1 for s in b.shape[2:]):
            return f"lora_B kernel {tuple(b.shape[2:])} is not 1x1"
    else:
        has = adapter in getattr(layer, "lora_A", {}) or adapter in getattr(layer, "lora_embedding_A", {})
        return f"unsupported LoRA layer type {type(layer).__name__}" if has else None
    if not isinstance(w, Tensor) or not w.is_floating_point():
        return "the base weight is not a floating-point tensor (quantized?)"
    pair = LoraPair(name, layer, a, b, w, kind, transposed, scaling)
    if pair.w2d().shape != (pair.b2d().shape[0], pair.a2d().shape[1]) or pair.b2d().shape[1] != pair.rank:
        return f"shapes do not compose: B {tuple(b.shape)}, A {tuple(a.shape)}, W {tuple(w.shape)}"
    return pair


def scan_lora(module: nn.Module, adapter: str = "default") -> tuple[list[LoraPair], list[tuple[str, str]]]:
    """(pairs, skipped): every peft LoRA layer carrying `adapter`, and (name, reason) for those skipped."""
    from peft.tuners.lora import LoraLayer

    pairs: list[LoraPair] = []
    skipped: list[tuple[str, str]] = []
    for name, layer in module.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        got = _classify(name, layer, adapter)
        if isinstance(got, LoraPair):
            pairs.append(got)
        elif isinstance(got, str):
            skipped.append((name, got))
    return pairs, skipped


def lora_pairs(module: nn.Module, adapter: str = "default") -> list[LoraPair]:
    """Every peft LoRA layer of `module` carrying `adapter` (Linear, Conv, Embedding), in module order.

    Layers that cannot be handled are skipped with a warning naming the layer and the reason.
    """
    pairs, skipped = scan_lora(module, adapter)
    for name, reason in skipped:
        warnings.warn(f"CS: skipping LoRA layer {name}: {reason}", stacklevel=2)
    return pairs


# ----------------------------------------------------------------------------------------------
# CS (Eq. 2)


class CosineSimilarity:
    """CS (Eq. 2) of a peft-wrapped module, without forming B A. Call it after each optimizer step.

    `cs()` or `cs.value()` -> float (one device sync); `cs.tensor()` -> 0-dim float32 tensor on the
    first layer's device with no sync (for a trainer that defers `.item()`); `cs.per_layer()` ->
    float32 tensor of the per-layer cosines. It reads the live LoRA parameters each call (autocast
    off, float32). Frozen-weight norms are computed once, here: build a new CosineSimilarity after
    the base weights change (merge, reload) or the model moves to another device.

    With `cuda_graph=True` on CUDA, the per-layer work (5 small kernels per layer, which eager
    PyTorch launches one by one: about 20 ms for SD 1.5's 128 layers on an H100, CPU-bound) is
    captured once in a CUDA graph and replayed; the graph is captured again whenever a parameter's
    storage moved (data_ptr changed), and eager mode is used if capture fails. It is opt-in until it
    has been checked on a GPU (tests/test_monitor.py has the check; it skips without CUDA).
    """

    def __init__(self, module: nn.Module, adapter: str = "default", cuda_graph: bool | None = None) -> None:
        self.adapter = adapter
        self.pairs, self.skipped = scan_lora(module, adapter)
        for name, reason in self.skipped:
            warnings.warn(f"CS: skipping LoRA layer {name}: {reason}", stacklevel=2)
        if not self.pairs:
            raise ValueError(f"CS: no LoRA layers with adapter {adapter!r} in {type(module).__name__}")
        self.device = self.pairs[0].a.device
        with torch.no_grad():
            self._w_norm = torch.stack(
                [torch.linalg.vector_norm(p.w.detach().float()).to(self.device) for p in self.pairs]
            )
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(self.pairs):
            key = (tuple(p.a2d().shape), tuple(p.b2d().shape), p.a.device, p.b.device)
            groups.setdefault(key, []).append(i)
        self._groups = list(groups.values())
        flat = [i for g in self._groups for i in g]
        self._order = torch.empty(len(flat), dtype=torch.long)
        self._order[torch.tensor(flat)] = torch.arange(len(flat))
        self._order = self._order.to(self.device)
        same_device = all(t.device == self.device for p in self.pairs for t in (p.a, p.b, p.w))
        want = False if cuda_graph is None else bool(cuda_graph)
        self.cuda_graph = want and self.device.type == "cuda" and same_device
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_out: Tensor | None = None
        self._graph_ptrs: tuple[int, ...] = ()
        self.captures = 0  # how many times the CUDA graph was captured

    def __len__(self) -> int:
        return len(self.pairs)

    def _pointers(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for p in self.pairs for t in (p.a, p.b, p.w))

    def _compute(self) -> Tensor:
        """Per-layer cosines. Layers of equal shapes are batched: per layer only W A^T is its own
        product (W differs); stacking, the Gram matrices and the reductions run once per shape."""
        dev = self.device
        dots, sqs = [], []
        with torch.no_grad(), torch.autocast(dev.type, enabled=False):
            for group in self._groups:
                a = torch.stack([self.pairs[i].a2d().detach() for i in group]).float()  # n x r x k
                b = torch.stack([self.pairs[i].b2d().detach() for i in group]).float()  # n x d x r
                wa = []
                for n, i in enumerate(group):
                    w = self.pairs[i].w2d().detach()
                    wa.append((w.float() if w.dtype != torch.float32 else w) @ a[n].T)  # d x r
                # <BA, W>_F = sum(B * (W A^T)) = sum((B^T W) * A);  ||BA||_F^2 = sum((B^T B) * (A A^T))
                dots.append((torch.stack(wa) * b).sum((1, 2)).to(dev))
                sqs.append(((b.transpose(1, 2) @ b) * (a @ a.transpose(1, 2))).sum((1, 2)).to(dev))
            dot = torch.cat(dots)[self._order]
            sq = torch.cat(sqs)[self._order]
            denom = torch.sqrt(sq.clamp_min(0)) * self._w_norm
            ok = denom > 0  # B A = 0 (or W = 0): CS of the layer is 0 by definition
            return torch.where(
                ok, dot / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(dot)
            )

    def _capture(self) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up (cuBLAS handles, workspaces) outside the capture
                self._compute()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._compute()
        self._graph, self._graph_out, self._graph_ptrs = graph, out, self._pointers()
        self.captures += 1

    def per_layer(self) -> Tensor:
        if self.cuda_graph:
            try:
                if self._graph is None or self._pointers() != self._graph_ptrs:
                    self._capture()
                assert self._graph is not None and self._graph_out is not None
                self._graph.replay()
                return self._graph_out.clone()  # the next replay overwrites the graph's output
            except Exception as e:  # pragma: no cover - depends on the CUDA setup
                warnings.warn(f"CS: CUDA graph capture failed ({e}); computing eagerly", stacklevel=2)
                self.cuda_graph, self._graph, self._graph_out = False, None, None
        return self._compute()

    def tensor(self) -> Tensor:
        return self.per_layer().mean()

    def value(self) -> float:
        return float(self.tensor().item())

    def __call__(self) -> float:
        return self.value()


@torch.no_grad()
def cs_naive(module: nn.Module, adapter: str = "default") -> float:
    """CS by forming each layer's delta weight with peft (float64): the reference for tests and benches."""
    pairs = lora_pairs(module, adapter)
    if not pairs:
        raise ValueError(f"CS: no LoRA layers with adapter {adapter!r} in {type(module).__name__}")
    values = []
    for p in pairs:
        layer = p.layer
        if p.kind == "embedding":
            delta = (p.b.double() @ p.a.double()).T
        else:
            delta = layer.get_delta_weight(adapter).double()
        w = p.w.double()
        delta = delta.reshape(-1)
        w = w.reshape(-1)
        nd, nw = torch.linalg.vector_norm(delta), torch.linalg.vector_norm(w)
        values.append(0.0 if nd == 0 or nw == 0 else float(torch.dot(delta, w) / (nd * nw)))
    return float(np.mean(values))


# ----------------------------------------------------------------------------------------------
# CS-Fluctuation (Eqs. 3-4)


def _sliding(x: np.ndarray, m: int, fn: str) -> np.ndarray:
    """Mean or (population) variance of every window of `m` consecutive values, two-pass, in chunks."""
    n = len(x) - m + 1
    if n <= 0:
        return np.empty(0)
    view = np.lib.stride_tricks.sliding_window_view(x, m)
    out = np.empty(n)
    step = max(1, (1 << 21) // m)
    for s in range(0, n, step):
        block = view[s : s + step]
        out[s : s + step] = block.mean(axis=1) if fn == "mean" else block.var(axis=1)
    return out


def _csf_core(cs: np.ndarray, window: int) -> np.ndarray:
    """Variance part of Eq. 4 for every index j = 1..n-3M+2, returned at position j-1."""
    m = window
    ma = _sliding(cs, m, "mean")  # A_i, i = 0..n-M
    slope = np.diff(ma)  # dA_i at position i-1, i = 1..n-M
    x = _sliding(slope, m, "mean")  # X_j at position j-1
    return _sliding(x, m, "var")  # Var(X_j..X_{j+M-1}) at position j-1


def csf_lag(window: int) -> int:
    """Steps between a CS-Fluctuation index j and the step at which CSF_j becomes known: 3(M-1)."""
    return 3 * (window - 1)


def cs_fluctuation(cs: Sequence[float], window: int, lr: float | Sequence[float]) -> list[float | None]:
    """CS-Fluctuation (Eqs. 3-4) of a whole CS series, aligned with it by step index.

    out[j] = CSF_j as in the module docstring: defined for 1 <= j <= len(cs) - 3*window + 2 (and
    lr_j > 0), None elsewhere (index 0 has no slope; the last 3*window - 3 values are not known yet).
    `lr` is one learning rate or one per step (same length as `cs`).
    """
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    values = np.asarray(cs, dtype=np.float64)
    n = len(values)
    if isinstance(lr, (int, float)):
        lrs = np.full(n, float(lr))
    else:
        lrs = np.asarray(lr, dtype=np.float64)
        if lrs.shape != (n,):
            raise ValueError(f"lr: expected one value or {n} values, got {lrs.shape[0] if lrs.ndim else 1}")
    out: list[float | None] = [None] * n
    var = _csf_core(values, window)
    for pos, v in enumerate(var):
        j = pos + 1
        if lrs[j] > 0:
            out[j] = float(v / lrs[j])
    return out


# ----------------------------------------------------------------------------------------------
# Turning point (Algorithm 1)


class TurningPointDetector:
    """Online CS-Fluctuation and second-valley detection; see the module docstring for the rules.

    Call `update(step, cs, lr)` once per training step, with consecutive steps. It returns the
    turning-point step (a window boundary) the first time the second valley is confirmed, else None.
    """

    def __init__(
        self,
        window: int,
        min_rise: float = 0.1,
        min_valley_distance: int | None = None,
        horizon: int | None = None,
    ) -> None:
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        if min_rise < 0:
            raise ValueError(f"min_rise must be >= 0, got {min_rise}")
        self.window = window
        self.min_rise = float(min_rise)
        self.min_valley_distance = int(min_valley_distance) if min_valley_distance is not None else window
        self.horizon = int(horizon) if horizon is not None else 4 * window
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        span = 3 * window - 1  # CS_{j-1} .. CS_{j+3M-3}
        self._cs: list[float] = []
        self._lr: list[float] = []
        self._span = span
        self._first_step: int | None = None
        self._last_step: int | None = None
        self._series: list[tuple[int, float | None]] = []
        self._log: list[tuple[int, float, float]] = []  # raw inputs, for state_dict()
        # detection samples (non-None CSF): steps, values, the threshold known when each arrived
        self._st: list[int] = []
        self._y: list[float] = []
        self._thr: list[float] = []
        self._ymin = math.inf
        self._ymax = -math.inf
        self.valleys: list[int] = []
        self.valley_values: list[float] = []
        self.peaks: list[int] = []
        self.turning_point: int | None = None
        self.turning_valley: int | None = None  # the valley step before snapping
        self.confirmed_at: int | None = None  # the step at which the turning point was returned
        self._reset_valley(0)
        self._pos = 0  # next detection sample to process

    # -- public ----------------------------------------------------------------------------------

    @property
    def max_lag(self) -> int:
        """Upper bound of (step at which the turning point is returned) - (turning-point step)."""
        return self.horizon + self.min_valley_distance + csf_lag(self.window) + self.window // 2

    @property
    def series(self) -> list[tuple[int, float | None]]:
        """(step, CS-Fluctuation) computed so far, indexed as in `cs_fluctuation` (None: lr <= 0)."""
        return list(self._series)

    def is_boundary(self, step: int) -> bool:
        """Whether the trainer should keep a snapshot of the weights after `step`."""
        return step % self.window == 0

    def oldest_needed_step(self, current_step: int) -> int:
        """Boundary snapshots of steps before this one can be dropped: they can no longer become the
        turning point. (Once found, the turning point's own snapshot is the trainer's to keep, e.g.
        with `SnapshotKeeper.pin`.)"""
        return current_step - self.max_lag

    def update(self, step: int, cs: float, lr: float) -> int | None:
        if self._last_step is not None and step != self._last_step + 1:
            raise ValueError(
                f"TurningPointDetector.update: step {step} after {self._last_step}; steps must be consecutive"
            )
        if self._first_step is None:
            self._first_step = step
        self._last_step = step
        self._log.append((int(step), float(cs), float(lr)))
        self._cs.append(float(cs))
        self._lr.append(float(lr))
        if len(self._cs) > self._span:
            del self._cs[0], self._lr[0]
        if len(self._cs) < self._span:
            return None
        j = step - csf_lag(self.window)  # the index step of the new CSF value
        lr_j = self._lr[1]  # _cs[0] is CS_{j-1}, _cs[1] is CS_j
        var = float(_csf_core(np.asarray(self._cs), self.window)[0])
        found = self.observe_csf(j, var / lr_j if lr_j > 0 else None)
        if found is not None:
            self.confirmed_at = step
        return found

    def observe_csf(self, j: int, value: float | None) -> int | None:
        """Feed one CS-Fluctuation value (index step j, increasing) to the valley tracker.

        `update` calls it; it is public for replaying a CS-Fluctuation series computed elsewhere.
        Returns the turning point the first time it is final, else None.
        """
        if self._st and j <= self._st[-1]:
            raise ValueError(f"observe_csf: step {j} is not after {self._st[-1]}")
        if self._first_step is None:
            self._first_step = j
        self._series.append((j, value))
        if value is None or not math.isfinite(value):
            return None
        self._ymin, self._ymax = min(self._ymin, value), max(self._ymax, value)
        self._st.append(j)
        self._y.append(value)
        self._thr.append(self.min_rise * (self._ymax - self._ymin))
        self._run()
        if self.turning_point is None and len(self.valleys) >= 2:
            # The second valley is final once no valley closer than min_valley_distance can still
            # merge into it: a third valley was counted, the search is past that distance (a peak
            # search, or a valley candidate beyond it: both only move forward), or a candidate
            # before it could no longer be confirmed (horizon).
            limit = self.valleys[1] + self.min_valley_distance
            cand = self._st[self._cand] if self._mode == "valley" and self._cand is not None else None
            if (
                len(self.valleys) >= 3
                or j >= limit + self.horizon
                or (self._mode == "peak" and j >= limit)
                or (cand is not None and cand >= limit)
            ):
                v2 = self.valleys[1]
                self.turning_valley = v2
                self.turning_point = self._snap(v2)
                self.confirmed_at = j
                return self.turning_point
        return None

    @property
    def pending_turning_point(self) -> int | None:
        """The (snapped) second valley found so far but not yet final; the turning point once final."""
        if self.turning_point is not None:
            return self.turning_point
        return self._snap(self.valleys[1]) if len(self.valleys) >= 2 else None

    def state_dict(self) -> dict:
        """Everything needed to rebuild the detector (its inputs), JSON-serialisable."""
        return {
            "window": self.window,
            "min_rise": self.min_rise,
            "min_valley_distance": self.min_valley_distance,
            "horizon": self.horizon,
            "inputs": [list(t) for t in self._log],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping) -> TurningPointDetector:
        det = cls(state["window"], state["min_rise"], state["min_valley_distance"], state["horizon"])
        for step, cs, lr in state["inputs"]:
            det.update(int(step), float(cs), float(lr))
        return det

    # -- detection ---------------------------------------------------------------------------------

    def _reset_valley(self, start: int) -> None:
        self._mode = "valley"
        self._seg = start  # first sample of the descent segment
        self._cand: int | None = None
        self._desc = -math.inf  # max over [seg .. cand]
        self._runmax = -math.inf  # max over [seg .. current]

    def _reset_peak(self) -> None:
        self._mode = "peak"
        self._pk: int | None = None
        self._post_min: int | None = None

    def _run(self) -> None:
        i = self._pos
        while i < len(self._y):
            nxt = self._valley_at(i) if self._mode == "valley" else self._peak_at(i)
            i = nxt if nxt is not None else i + 1
        self._pos = i

    def _valley_at(self, i: int) -> int | None:
        """Process sample i in valley mode; return the sample to resume from after a state change."""
        y, thr, st = self._y[i], self._thr[i], self._st
        self._runmax = max(self._runmax, y)
        c = self._cand
        if c is None or y < self._y[c]:
            self._cand, self._desc = i, self._runmax
            return None
        if y - self._y[c] > thr and self._desc - self._y[c] > thr and st[i] - st[c] <= self.horizon:
            self._confirm_valley(c, i)
            self._reset_peak()
            return c + 1
        if st[i] - st[c] >= self.horizon:  # a plateau, not a turn: restart after the candidate
            self._reset_valley(c + 1)
            return c + 1
        return None

    def _peak_at(self, i: int) -> int | None:
        y, thr = self._y[i], self._thr[i]
        if self._pk is None or y > self._y[self._pk]:
            self._pk, self._post_min = i, None
            return None
        if self._post_min is None or y < self._y[self._post_min]:
            self._post_min = i
        if self._y[self._pk] - y > thr:
            pk = self._pk
            self.peaks.append(self._st[pk])
            self._reset_valley(pk)
            return pk
        return None

    def _confirm_valley(self, c: int, i: int) -> None:
        step, value = self._st[c], self._y[c]
        if self.valleys and step - self.valleys[-1] < self.min_valley_distance:
            if value < self.valley_values[-1]:
                self.valleys[-1], self.valley_values[-1] = step, value
        else:
            self.valleys.append(step)
            self.valley_values.append(value)

    def _snap(self, step: int) -> int:
        m = self.window
        lo = (step // m) * m
        b = lo if step - lo <= (lo + m) - step else lo + m
        first = self._first_step if self._first_step is not None else 0
        while b < first:
            b += m
        return b


# ----------------------------------------------------------------------------------------------
# Snapshots


class SnapshotKeeper:
    """Real copies of a (LoRA) state dict at chosen steps, for returning the turning point exactly.

    `keep(step, state)` stores a detached copy of every tensor: on `device` ("cpu" by default, which
    costs a device-to-host copy per snapshot but no accelerator memory), or on each tensor's own
    device when `device=None`. Later in-place updates of the live tensors never change a kept copy.

    The trainer's loop, per step:
        if detector.is_boundary(step): keeper.keep(step, lora_state_dict)
        tp = detector.update(step, cs, lr)
        if tp is not None: keeper.pin(tp)          # keeper.get(tp) holds the turning-point weights
        keeper.drop_before(detector.oldest_needed_step(step))
    which holds at most max_lag // window + 1 boundary snapshots, plus the pinned turning point.
    """

    def __init__(self, device: str | torch.device | None = "cpu") -> None:
        self.device = torch.device(device) if device is not None else None
        self._snaps: dict[int, dict[str, Tensor]] = {}
        self._pinned: set[int] = set()

    def keep(self, step: int, state: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            if self.device is None:
                copy = {k: v.detach().clone() for k, v in state.items()}
            else:
                copy = {k: v.detach().to(self.device, copy=True) for k, v in state.items()}
        self._snaps[int(step)] = copy

    def get(self, step: int) -> dict[str, Tensor]:
        """The copy kept at `step` (the keeper's own tensors: clone them before modifying)."""
        try:
            return self._snaps[int(step)]
        except KeyError:
            raise KeyError(f"no snapshot kept at step {step} (kept: {self.steps})") from None

    def pin(self, step: int) -> None:
        """Keep the snapshot of `step` through `drop_before` (e.g. the turning point)."""
        if int(step) not in self._snaps:
            raise KeyError(f"no snapshot kept at step {step} (kept: {self.steps})")
        self._pinned.add(int(step))

    def drop_before(self, step: int) -> None:
        """Drop every unpinned snapshot older than `step` (e.g. detector.oldest_needed_step(current))."""
        for s in [s for s in self._snaps if s < step and s not in self._pinned]:
            del self._snaps[s]

    def drop(self, step: int) -> None:
        self._snaps.pop(int(step), None)
        self._pinned.discard(int(step))

    @property
    def pinned(self) -> list[int]:
        return sorted(self._pinned)

    @property
    def steps(self) -> list[int]:
        return sorted(self._snaps)

    def __contains__(self, step: object) -> bool:
        return step in self._snaps

    def __len__(self) -> int:
        return len(self._snaps)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for snap in self._snaps.values() for t in snap.values())


__all__ = [
    "LoraPair",
    "scan_lora",
    "lora_pairs",
    "CosineSimilarity",
    "cs_naive",
    "csf_lag",
    "cs_fluctuation",
    "TurningPointDetector",
    "SnapshotKeeper",
]
