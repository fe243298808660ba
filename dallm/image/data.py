"""Training images: a folder of png/jpg/jpeg/webp files with optional same-name captions.

Every image is opened, checked and preprocessed up front (resize + centre crop to the model
resolution), before the model loads, so that a bad file fails fast and names itself. Datasets in
this project are small (5-50 images), so the preprocessed tensors stay in memory and the training
loop draws batches from them itself: a batch is a pure function of (seed, step), which makes
resuming exact without any sampler state.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dallm.config import ConfigError, DataConfig
from dallm.image.files import IGNORED_EXTS, IMAGE_EXTS, ImageFileError, open_rgb


class DataError(ConfigError):
    """A training image that cannot be used; the message names the file."""


@dataclass
class ImageSet:
    """Preprocessed images in [-1, 1], shape (N, 3, R, R), with one caption per image."""

    pixels: torch.Tensor
    captions: list[str]
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)


def _load_image(path: Path, resolution: int, min_size: int, center_crop: bool) -> torch.Tensor:
    """Open, check and preprocess one file; raise DataError naming it on any problem."""
    try:
        rgb = open_rgb(path, min_size)
    except ImageFileError as e:
        raise DataError(f"{path}: {e}") from None
    w, h = rgb.size
    # Resize the shorter side to the resolution, then crop a square (centre or top-left).
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    rgb = rgb.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = ((nw - resolution) // 2, (nh - resolution) // 2) if center_crop else (0, 0)
    rgb = rgb.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def list_images(folder: Path, key: str, on_bad: str) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files of `folder` sorted by name; unsupported files are errors (or skipped)."""
    if not folder.exists():
        raise DataError(f"{key}: folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{key}: {folder} is not a folder")
    images, skipped = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        ext = path.suffix.lower()
        if ext in IMAGE_EXTS:
            images.append(path)
        elif ext not in IGNORED_EXTS:
            reason = f"unsupported file type {ext or '(none)'!r}; use {', '.join(IMAGE_EXTS)}"
            if on_bad == "error":
                raise DataError(f"{path}: {reason}")
            skipped.append((path, reason))
    return images, skipped


def load_images(
    folder: Path,
    *,
    key: str,
    resolution: int,
    prompt: str,
    cfg: DataConfig,
    limit: int | None = None,
    caption_ext: str | None = None,
) -> ImageSet:
    """Load a folder into an ImageSet; `key` (e.g. "data.dir") prefixes folder-level errors."""
    min_size = cfg.min_size if cfg.min_size is not None else max(1, resolution // 2)
    paths, skipped = list_images(folder, key, cfg.on_bad_image)
    tensors, captions, used = [], [], []
    for path in paths:
        if limit is not None and len(used) >= limit:
            break
        try:
            tensors.append(_load_image(path, resolution, min_size, cfg.center_crop))
        except DataError as e:
            if cfg.on_bad_image == "error":
                raise
            skipped.append((path, str(e).removeprefix(f"{path}: ")))
            continue
        caption_file = path.with_suffix(caption_ext) if caption_ext else None
        if caption_file is not None and caption_file.is_file():
            captions.append(caption_file.read_text(encoding="utf-8").strip())
        else:
            captions.append(prompt)
        used.append(path)
    if not used:
        why = f" ({len(skipped)} bad files skipped)" if skipped else ""
        raise DataError(f"{key}: no usable images in {folder}{why}")
    if skipped:
        warnings.warn(f"{key}: skipped {len(skipped)} bad file(s) in {folder}", stacklevel=2)
    return ImageSet(torch.stack(tensors), captions, used, skipped)


def load_training_data(cfg: DataConfig, resolution: int) -> tuple[ImageSet, ImageSet | None]:
    """The instance images (and class images for prior preservation), validated up front."""
    assert cfg.dir is not None
    images = load_images(
        Path(cfg.dir),
        key="data.dir",
        resolution=resolution,
        prompt=cfg.instance_prompt,
        cfg=cfg,
        limit=cfg.limit,
        caption_ext=cfg.caption_ext,
    )
    if any(not c for c in images.captions):
        missing = next(p for p, c in zip(images.paths, images.captions, strict=True) if not c)
        raise DataError(f"data.instance_prompt: required, {missing} has no {cfg.caption_ext} caption")
    classes = None
    if cfg.class_dir is not None:
        classes = load_images(
            Path(cfg.class_dir), key="data.class_dir", resolution=resolution, prompt=cfg.class_prompt, cfg=cfg
        )
    return images, classes
