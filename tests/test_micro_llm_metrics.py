"""Perplexity metrics of the micro LLM world against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from dallm.micro_llm.metrics import IGNORE, delta_std, perplexity_from_nll, sequence_nll


def test_sequence_nll_shifts_and_ignores_padding() -> None:
    # Position t predicts label t+1. Probabilities (0.5, 0.25, 0.25) at every position.
    logits = torch.log(torch.tensor([0.5, 0.25, 0.25])).expand(2, 4, 3).clone()
    labels = torch.tensor([[2, 0, 1, IGNORE], [1, 0, 0, 0]])
    s, c = sequence_nll(logits, labels)
    # text 0 predicts labels 0, 1 (the last is padding): log 2 + log 4; text 1 predicts 0, 0, 0
    assert c.tolist() == [2, 3]
    assert s[0].item() == pytest.approx(math.log(2) + math.log(4))
    assert s[1].item() == pytest.approx(3 * math.log(2))


def test_sequence_nll_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="logits"):
        sequence_nll(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.long))


def test_perplexity_and_delta_std_by_hand() -> None:
    # sums (2, 4) over counts (1, 3): R = 6/4 = 1.5, residuals s - R c = (0.5, -0.5),
    # Var(R) = 2/1 * 0.5 / 4^2 = 1/16, so std(ppl) = e^1.5 * 0.25.
    p = perplexity_from_nll([2.0, 4.0], [1, 3])
    assert p.value == pytest.approx(math.exp(1.5))
    assert (p.n_texts, p.n_tokens) == (2, 4)
    assert delta_std([2.0, 4.0], [1, 3]) == pytest.approx(math.exp(1.5) * 0.25)


def test_bootstrap_spread_is_zero_when_every_text_is_alike_and_for_one_text() -> None:
    p = perplexity_from_nll([0.5, 1.0, 1.5, 2.0], [1, 2, 3, 4])  # 0.5 nats per token in every text
    assert p.value == pytest.approx(math.exp(0.5)) and p.std == pytest.approx(0.0, abs=1e-12)
    one = perplexity_from_nll([3.0], [2])
    assert one.value == pytest.approx(math.exp(1.5)) and one.std == 0.0


def test_bootstrap_agrees_with_the_delta_method_and_is_seeded() -> None:
    g = torch.Generator().manual_seed(1)
    counts = torch.randint(10, 30, (300,), generator=g)
    sums = counts * (1.0 + 0.5 * torch.rand(300, generator=g, dtype=torch.float64))
    a = perplexity_from_nll(sums, counts, n_boot=2000, seed=3)
    b = perplexity_from_nll(sums, counts, n_boot=2000, seed=3)
    assert a == b
    assert a.std == pytest.approx(delta_std(sums, counts), rel=0.1)
    # the spread shrinks like 1/sqrt(n): four copies of the texts, half the spread
    big = perplexity_from_nll(sums.repeat(4), counts.repeat(4), n_boot=2000, seed=3)
    assert big.value == pytest.approx(a.value)
    assert big.std == pytest.approx(a.std / 2, rel=0.15)


@pytest.mark.parametrize(
    ("sums", "counts", "match"),
    [([], [], "at least one"), ([1.0, 2.0], [1], "same"), ([1.0], [0], "at least one predicted token")],
)
def test_perplexity_rejects_bad_input(sums: list[float], counts: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        perplexity_from_nll(sums, counts)
