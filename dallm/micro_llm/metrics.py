"""Perplexity with a spread: pure functions (tensors and strings in, numbers out, no I/O).

These play KID's part for LLM jobs: `ppl_val` (held-out target text), `ppl_train` (the training
targets) and `ppl_base` (text of the base distribution: forgetting).

Perplexity of a set of texts is exp(total NLL / total predicted tokens), the corpus-level figure
(texts weigh by their length, as in the usual evaluation of a language model). Its spread is a
bootstrap over texts: resample the texts with replacement, recompute the corpus perplexity, and
take the standard deviation. Texts, not tokens, are the independent units here (tokens inside one
text are strongly dependent), so this is the spread one would see with another draw of evaluation
texts. `delta_std` gives the first-order (delta-method) approximation of the same spread in closed
form, for checking.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100  # label value that is not predicted (padding), as in transformers


@dataclass(frozen=True)
class Perplexity:
    value: float  # exp(total NLL / total tokens)
    std: float  # bootstrap standard deviation over texts
    n_texts: int
    n_tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "std": self.std, "n_texts": self.n_texts, "n_tokens": self.n_tokens}


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed NLL and predicted-token count of a causal LM.

    logits [B, T, V] at positions 0..T-1 predict labels at positions 1..T-1 (the shift is done
    here, as transformers does for its loss); labels equal to -100 are not counted.
    Returns (nll_sum [B] float64, count [B] int64).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}: expected [B,T,V] and [B,T]"
        )
    pred = logits[:, :-1].float()
    target = labels[:, 1:]
    nll = F.cross_entropy(pred.transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
    mask = target != IGNORE
    return (nll * mask).sum(1).double(), mask.sum(1)


def perplexity_from_nll(
    nll_sums: torch.Tensor | Sequence[float],
    counts: torch.Tensor | Sequence[int],
    n_boot: int = 200,
    seed: int = 0,
) -> Perplexity:
    """Corpus perplexity of texts given their summed NLL and token counts, with a bootstrap spread.

    The bootstrap draws `n_boot` resamples of the texts (fixed `seed`: the same inputs give the
    same spread). One text has no spread (std 0.0).
    """
    s = torch.as_tensor(nll_sums, dtype=torch.float64).flatten()
    c = torch.as_tensor(counts, dtype=torch.float64).flatten()
    if s.numel() == 0 or s.shape != c.shape:
        raise ValueError(
            f"perplexity: {s.numel()} NLL sums and {c.numel()} counts (need the same, at least one)"
        )
    if bool((c <= 0).any()):
        raise ValueError("perplexity: every text needs at least one predicted token")
    value = math.exp(float(s.sum() / c.sum()))
    n = s.numel()
    if n == 1 or n_boot < 2:
        return Perplexity(value, 0.0, n, int(c.sum()))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    boot = torch.exp(s[idx].sum(1) / c[idx].sum(1))
    return Perplexity(value, float(boot.std(unbiased=True)), n, int(c.sum()))


def delta_std(nll_sums: torch.Tensor | Sequence[float], counts: torch.Tensor | Sequence[int]) -> float:
    """Closed-form (delta-method) standard deviation of the corpus perplexity over texts.

    With R = sum(s)/sum(c) the mean NLL per token, Var(R) ~ n/(n-1) * sum((s_i - R c_i)^2) / sum(c)^2
    (the ratio estimator's variance), and std(exp R) ~ exp(R) * std(R).
    """
    s = torch.as_tensor(nll_sums, dtype=torch.float64).flatten()
    c = torch.as_tensor(counts, dtype=torch.float64).flatten()
    n = s.numel()
    if n < 2:
        return 0.0
    r = s.sum() / c.sum()
    var = n / (n - 1) * ((s - r * c) ** 2).sum() / c.sum() ** 2
    return float(torch.exp(r) * var.sqrt())


def encode(
    tokenizer, texts: Sequence[str], max_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels (-100 at padding) for texts, each ending in EOS.

    The tokenizer adds BOS; EOS is appended here, so a model is scored on ending the text too.
    """
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("tokenizer: needs eos and pad tokens")
    rows = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    if max_length is not None:
        rows = [r[:max_length] for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(r)
    return ids, labels


@torch.no_grad()
def text_nll(
    model, tokenizer, texts: Sequence[str], batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-text summed NLL and token counts of `model` on `texts` (no gradients; mode unchanged)."""
    device = next(model.parameters()).device
    sums, counts = [], []
    for i in range(0, len(texts), batch_size):
        ids, labels = encode(tokenizer, texts[i : i + batch_size])
        mask = (labels != IGNORE).long()
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        s, c = sequence_nll(logits.cpu(), labels)
        sums.append(s)
        counts.append(c)
    return torch.cat(sums), torch.cat(counts)


def model_perplexity(
    model, tokenizer, texts: Sequence[str], batch_size: int = 64, n_boot: int = 200, seed: int = 0
) -> Perplexity:
    """Corpus perplexity of `model` on `texts` with a bootstrap spread over texts."""
    if not texts:
        raise ValueError("perplexity: no texts")
    was_training = model.training
    model.eval()
    try:
        s, c = text_nll(model, tokenizer, texts, batch_size)
    finally:
        model.train(was_training)
    return perplexity_from_nll(s, c, n_boot=n_boot, seed=seed)
