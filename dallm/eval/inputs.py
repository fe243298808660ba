"""What KID compares generated images against: the target image files of a folder, their features,
and the feature extractor a job's `eval.features` names."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dallm.config import ConfigError, JobConfig
from dallm.image.files import image_files

Extractor = Callable[[Any], torch.Tensor]  # list of PIL images or [N,3,H,W] in [0,1] -> [N,D]


def target_images(folder: Path, key: str, limit: int | None = None) -> list[Path]:
    """Image files of `folder` sorted by name (the first `limit`), as the data loader orders them."""
    if not folder.is_dir():
        raise ConfigError(f"{key}: folder {folder} does not exist")
    paths = image_files(folder)
    paths = paths[:limit] if limit else paths
    if len(paths) < 2:
        raise ConfigError(f"{key}: KID needs at least 2 images, {folder} has {len(paths)}")
    return paths


def features_of_files(extractor: Extractor, paths: Sequence[Path], batch_size: int) -> torch.Tensor:
    """Features of the image files `paths`, read `batch_size` at a time, as float32 on the CPU."""
    feats = []
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start : start + batch_size]:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        feats.append(torch.as_tensor(extractor(images)).detach().float().cpu())
    return torch.cat(feats)


def configured_extractor(cfg: JobConfig, device: torch.device) -> Extractor:
    """The feature extractor `eval.features` names (micro, inception, clip:FOLDER)."""
    from dallm.eval.features import FeatureError, load_extractor

    try:
        return load_extractor(
            cfg.eval.features, device=str(device), inception_weights=cfg.eval.inception_weights
        )
    except FeatureError as e:
        raise ConfigError(f"eval.features: {e}") from None
