"""Validation-free monitoring of LoRA fine-tuning, part 1: CS, the cosine of B A to W (Eq. 2).

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

CS-Fluctuation and the turning point built on it live in `dallm.monitor.csf`; `dallm.monitor.early_stop` uses both.
"""

from __future__ import annotations

import warnings
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

    `batch_w` (default: on CUDA) computes W A^T for layers of equal shape with one batched matmul
    over a stacked copy of their W (in chunks of at most `W_CHUNK_BYTES` of float32), instead of
    one matmul (plus a float32 cast for bf16 weights) per layer: about 3 kernels per chunk instead of
    1-2 per layer, for a transient copy of W. On the CPU the per-layer loop reads W in place and
    copies nothing, so it stays the default there. Same values either way (tests/test_cs.py).
    """

    W_CHUNK_BYTES = 64 * 2**20

    def __init__(
        self,
        module: nn.Module,
        adapter: str = "default",
        cuda_graph: bool | None = None,
        batch_w: bool | None = None,
    ) -> None:
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
        self.batch_w = self.device.type == "cuda" if batch_w is None else bool(batch_w)
        self._chunks: list[list[tuple[int, int]]] = []  # per group: [start, end) runs of its layers
        for group in self._groups:
            w = self.pairs[group[0]].w
            per = max(1, self.W_CHUNK_BYTES // (4 * w.numel()))
            self._chunks.append([(s, min(s + per, len(group))) for s in range(0, len(group), per)])
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
            for group, chunks in zip(self._groups, self._chunks, strict=True):
                a = torch.stack([self.pairs[i].a2d().detach() for i in group]).float()  # n x r x k
                b = torch.stack([self.pairs[i].b2d().detach() for i in group]).float()  # n x d x r
                if self.batch_w:  # one bmm per chunk of equal-shape W: n x d x k @ n x k x r
                    wa = torch.cat(
                        [
                            torch.stack([self.pairs[i].w2d().detach() for i in group[s:e]]).float()
                            @ a[s:e].transpose(1, 2)
                            for s, e in chunks
                        ]
                    )
                else:
                    ws = [self.pairs[i].w2d().detach() for i in group]
                    wa = torch.stack(
                        [(w.float() if w.dtype != torch.float32 else w) @ a[n].T for n, w in enumerate(ws)]
                    )  # n x d x r
                # <BA, W>_F = sum(B * (W A^T)) = sum((B^T W) * A);  ||BA||_F^2 = sum((B^T B) * (A A^T))
                dots.append((wa * b).sum((1, 2)).to(dev))
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


__all__ = ["LoraPair", "scan_lora", "lora_pairs", "CosineSimilarity", "cs_naive"]
