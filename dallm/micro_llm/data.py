"""Text sets of the micro LLM world: teacher train/validation targets and base-distribution text.

The teacher sets describe disjoint scenes (no validation scene is a training scene), so a model
that memorises its training targets gets worse on validation: fine-tuning improves, then overfits.
Base text uses seeds the pretraining corpus does not (it measures forgetting: `ppl_base`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from dallm.micro_llm import world

BASE_SEED_OFFSET = 2000  # base text for ppl_base: a seed the build's corpus (seed 0) does not use


@dataclass(frozen=True)
class TextSets:
    train: list[str]  # teacher dialect, training targets
    validation: list[str]  # teacher dialect, held-out scenes
    base: list[str]  # base dialect (forgetting)


def text_sets(n_train: int = 64, n_val: int = 64, n_base: int = 128, seed: int = 0) -> TextSets:
    """Teacher train/validation texts over disjoint scenes and base-dialect texts, from `seed`."""
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_base", n_base)):
        if n < 1:
            raise ValueError(f"{name} {n}: must be at least 1")
    train_scenes, val_scenes = world.split_scenes(n_train, n_val, seed)
    rng = random.Random(seed)
    return TextSets(
        train=[world.describe(s, "teacher", rng) for s in train_scenes],
        validation=[world.describe(s, "teacher", rng) for s in val_scenes],
        base=world.corpus(n_base, "base", seed + BASE_SEED_OFFSET),
    )


def write_texts(path: Path, texts: list[str]) -> Path:
    """Write texts as JSONL (`{"text": ...}` per line) for a .jsonl path, else one text per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        body = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    else:
        if any("\n" in t for t in texts):
            raise ValueError(f"{path}: a text with a line break cannot be written one per line")
        body = "".join(t + "\n" for t in texts)
    path.write_text(body)
    return path


def write_text_sets(out: Path, sets: TextSets, fmt: str = "jsonl") -> dict[str, Path]:
    """train.<fmt>, validation.<fmt> and base.<fmt> in `out`; returns their paths by name."""
    if fmt not in ("jsonl", "txt"):
        raise ValueError(f"format {fmt!r}: expected 'jsonl' or 'txt'")
    return {
        name: write_texts(out / f"{name}.{fmt}", getattr(sets, name))
        for name in ("train", "validation", "base")
    }
