"""New tokens for textual inversion / pivotal tuning (the study's `<s1><s2>`).

The tokens are added to the tokenizer, the text encoder's input embedding grows to match, and the
new rows start from a given word's embedding or at random, scaled to the embedding's std. The whole
embedding matrix then requires grad, but after every optimizer step every other row is put back to
its original value (what diffusers' textual_inversion.py does), so only the new rows ever change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dallm.config import ConfigError, TokensConfig


@dataclass
class NewTokens:
    tokens: list[str]
    ids: list[int]
    embedding: torch.nn.Parameter  # the text encoder's input embedding weight (all rows)
    original: torch.Tensor  # a copy of the embedding weight right after initialisation
    keep: torch.Tensor  # bool mask, True for rows that must not change

    def rows(self) -> torch.Tensor:
        """The new rows, (len(tokens), dim), a detached CPU float32 copy."""
        return self.embedding.detach()[self.ids].to("cpu", torch.float32, copy=True)

    def set_rows(self, rows: torch.Tensor) -> None:
        with torch.no_grad():
            self.embedding[self.ids] = rows.to(self.embedding.device, self.embedding.dtype)

    @torch.no_grad()
    def restore_other_rows(self) -> None:
        self.embedding[self.keep] = self.original[self.keep]


def add_tokens(
    tokenizer: Any, text_encoder: Any, cfg: TokensConfig, generator: torch.Generator
) -> NewTokens | None:
    """Add `cfg.new` to the tokenizer and initialise their embeddings; None when there are none."""
    if not cfg.new:
        return None
    added = tokenizer.add_tokens(cfg.new)
    if added != len(cfg.new):
        raise ConfigError(f"tokens.new: {cfg.new} clash with tokens the tokenizer already has")
    ids = tokenizer.convert_tokens_to_ids(cfg.new)
    text_encoder.resize_token_embeddings(len(tokenizer))
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        if cfg.init_word is not None:
            word_ids = tokenizer.encode(cfg.init_word, add_special_tokens=False)
            if len(word_ids) != 1:
                raise ConfigError(
                    f"tokens.init_word: {cfg.init_word!r} is {len(word_ids)} tokens for this tokenizer; give a single-token word"
                )
            init = weight[word_ids[0]].detach().clone().expand(len(ids), -1)
        else:
            old = weight[: min(ids)].float()
            noise = torch.randn(len(ids), weight.shape[1], generator=generator).to(weight.device)
            init = noise * old.std() + old.mean()
        weight[ids] = init.to(weight.device, weight.dtype)
    weight.requires_grad_(True)
    keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    keep[ids] = False
    return NewTokens(list(cfg.new), list(ids), weight, weight.detach().clone(), keep)
