"""Shared fixtures: tiny Stable Diffusion folders built from configs, and folders of images."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(autouse=True)
def private_eval_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own shared-feature cache (`dallm.eval.cache`), never the user's."""
    folder = tmp_path / "eval-cache"
    monkeypatch.setenv("DALLM_CACHE", str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD-format folder (8x8 latents, 16x16 images), loadable with from_pretrained."""
    import torch

    torch.set_num_threads(1)
    from dallm.image.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "model")


@pytest.fixture(scope="session")
def tiny_sd_vpred(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dallm.image.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_v") / "model", prediction_type="v_prediction")


def write_images(folder: Path, n: int, size: int = 24, captions: bool = False, seed: int = 0) -> Path:
    """`n` random-coloured PNGs (with same-name .txt captions when asked)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
        if captions:
            (folder / f"img{i:03d}.txt").write_text(f"a red circle number {i}")
    return folder


@pytest.fixture
def image_dir(tmp_path: Path) -> Callable[..., Path]:
    """Factory: image_dir(n=4, size=24, captions=False, name="images") -> folder of PNGs."""

    def make(n: int = 4, size: int = 24, captions: bool = False, name: str = "images", seed: int = 0) -> Path:
        return write_images(tmp_path / name, n, size=size, captions=captions, seed=seed)

    return make
