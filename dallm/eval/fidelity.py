"""Prompt fidelity on held-out prompts: does a checkpoint still draw what the prompt asks for?

Overfitting shows first as the prompt being ignored (the paper's symptom; issue 23 measured shape as
prompted falling from 0.96 to 0.35 along one run while the validation KID, on training captions,
could not see it). Two measures, both pure functions of images (and prompts):

- micro world: the feature net's heads read each image; `micro_fidelity` gives the fraction whose
  shape, foreground and background colour match the prompt's scene, the fraction judged in the
  target style, and `fidelity` = the mean of the three content fractions (the one number a
  selection compares with the base model's).
- real models: a CLIP score, the cosine between the CLIP image embedding of each image and the text
  embedding of its prompt (`ClipScorer`, from a local folder as `clip:FOLDER` KID features are), in
  [-1, 1]; `fidelity` is its mean. (The usual "CLIPScore" is 100 * max(cos, 0); cosines are kept
  here so that a fall below 0 still counts.)

Held-out prompts (`held_out_prompts`): scenes whose (shape, foreground, background) appear in no
training caption, fixed by a seed, captioned as the training captions are (their style phrase, e.g.
"in <s1><s2> style"). Samples for them are the caller's (generation is not a metric).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dallm.micro.world import COLOUR_NAMES, SHAPES, STYLES, Scene, parse_prompt, sample_scene

CONTENT = ("shape", "fg", "bg")  # the micro heads that say whether the prompt was followed
HELD_OUT_SEED = 6060  # experiments/content.py's scene seed


# ----------------------------------------------------------------------------------------------
# Held-out prompts (micro world)


def _content(caption: str) -> tuple[str | None, str | None, str | None]:
    p = parse_prompt(caption)
    return p["shape"], p["fg"], p["bg"]


def held_out_scenes(n: int, training_captions: Sequence[str], seed: int = HELD_OUT_SEED) -> list[Scene]:
    """`n` scenes whose content (shape, fg, bg) is in no training caption; the same for the same inputs.

    The held-out combinations are drawn with replacement (positions and sizes vary), so n may exceed
    their number. ValueError when the training captions cover every combination.
    """
    seen = {_content(c) for c in training_captions}
    combos = [
        (s, f, b)
        for s in SHAPES
        for f in COLOUR_NAMES
        for b in COLOUR_NAMES
        if f != b and (s, f, b) not in seen
    ]
    if not combos:
        raise ValueError("held-out prompts: the training captions cover every scene of the micro world")
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(combos), size=n)
    return [sample_scene(rng, *combos[i]) for i in picks]


def held_out_prompts(
    n: int, training_captions: Sequence[str], seed: int = HELD_OUT_SEED
) -> tuple[list[Scene], list[str]]:
    """Held-out scenes and their prompts in the training captions' style phrase (the most common)."""
    scenes = held_out_scenes(n, training_captions, seed)
    styles = Counter(parse_prompt(c)["style"] for c in training_captions)
    style = styles.most_common(1)[0][0] if styles else None
    return scenes, [s.caption(style) for s in scenes]


# ----------------------------------------------------------------------------------------------
# Micro world: the feature net's heads


@torch.no_grad()
def prompt_following(net: Any, images: Tensor, scenes: Sequence[Scene]) -> dict[str, float]:
    """Fraction of `images` [N, 3, H, W] in [0, 1] whose shape / fg / bg (net's heads) match `scenes`."""
    pred = net.predict(images.to(next(net.parameters()).device))
    return _content_fractions(pred, scenes)


def _content_fractions(pred: dict[str, Tensor], scenes: Sequence[Scene]) -> dict[str, float]:
    y = torch.tensor([s.labels() for s in scenes], dtype=torch.long)
    return {k: float((pred[k].cpu() == y[:, i]).float().mean()) for i, k in enumerate(CONTENT)}


@torch.no_grad()
def micro_fidelity(
    net: Any, images: Tensor, scenes: Sequence[Scene], style: str = "baroque"
) -> dict[str, float]:
    """shape / fg / bg as prompted, `style` (the fraction judged in that style) and `fidelity` (mean content)."""
    if len(images) != len(scenes):
        raise ValueError(f"micro fidelity: {len(images)} images for {len(scenes)} scenes")
    pred = net.predict(images.to(next(net.parameters()).device))
    out = _content_fractions(pred, scenes)
    out["style"] = float((pred["style"].cpu() == STYLES.index(style)).float().mean())
    out["fidelity"] = float(np.mean([out[k] for k in CONTENT]))
    return out


# ----------------------------------------------------------------------------------------------
# Real models: CLIP score


def clip_cosines(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """Cosine between row i of the image and of the text embeddings [N, D]: [N] in [-1, 1], float64."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"CLIP score: {tuple(image_embeds.shape)} image and {tuple(text_embeds.shape)} text embeddings"
        )
    return torch.nn.functional.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=1)


class ClipScorer:
    """CLIP score of images against their prompts, from a local CLIP folder (image and text towers).

    The image side is `dallm.eval.features`' `clip:FOLDER` extractor (its preprocessing); the text
    side `CLIPTextModelWithProjection` and the folder's tokenizer.
    """

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        from dallm.eval.features import FeatureError, load_extractor

        folder = Path(folder).expanduser()
        self.images = load_extractor(f"clip:{folder}", device, batch_size=batch_size)
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.text = CLIPTextModelWithProjection.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:
            raise FeatureError(
                f"clip score: cannot load the CLIP text tower and tokenizer from {folder} ({type(e).__name__}: {e})".replace(
                    "\n", " "
                )
            ) from None
        self.device = torch.device(device)
        self.text.to(self.device).eval().requires_grad_(False)
        self.batch_size = batch_size

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            tok = self.tokenizer(
                list(prompts[i : i + self.batch_size]),
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).to(self.device)
            out.append(self.text(**tok).text_embeds.float().cpu())
        return torch.cat(out)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Any]:
        """`cosines` [N] (float64) and `fidelity`, their mean."""
        if len(images) != len(prompts):
            raise ValueError(f"CLIP score: {len(images)} images for {len(prompts)} prompts")
        cos = clip_cosines(self.images(images), self.text_embeds(prompts))
        return {"cosines": cos, "fidelity": float(cos.mean())}


__all__ = [
    "CONTENT",
    "HELD_OUT_SEED",
    "ClipScorer",
    "clip_cosines",
    "held_out_prompts",
    "held_out_scenes",
    "micro_fidelity",
    "prompt_following",
]
