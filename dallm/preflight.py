"""Check a job config's folders and files without loading any weights.

`load_config` validates the schema; `check_paths` adds what only the file system can say: the data
folders exist and hold images (at least `data.limit` of them), a local model folder exists, the
Inception weights file or CLIP folder named by `eval` is there. Every error is one line naming the
key and how to fix it, e.g. "data.dir: folder /x/train does not exist; fill it or pass
--set data.dir=FOLDER".
"""

from __future__ import annotations

from pathlib import Path

from dallm.config import ConfigError, JobConfig
from dallm.imagefiles import IMAGE_EXTS, image_files

__all__ = ["check_paths", "count_images"]


def count_images(folder: Path) -> int:
    return len(image_files(folder))


def _folder(key: str, value: Path | None, need: int = 1) -> None:
    if value is None:
        return
    path = Path(value).expanduser()
    fix = f"fill it or pass --set {key}=FOLDER"
    if not path.exists():
        raise ConfigError(f"{key}: folder {path} does not exist; {fix}")
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is not a folder; pass --set {key}=FOLDER")
    n = count_images(path)
    if n == 0:
        raise ConfigError(f"{key}: no images ({', '.join(IMAGE_EXTS)}) in {path}; {fix}")
    if n < need:
        raise ConfigError(f"{key}: {path} has {n} images, fewer than data.limit={need}")


def check_paths(cfg: JobConfig) -> None:
    """Raise ConfigError (one line, naming the key) when a folder or file of `cfg` is missing."""
    _folder("data.dir", cfg.data.dir, cfg.data.limit or 1)
    _folder("data.class_dir", cfg.data.class_dir)
    _folder("eval.val_dir", cfg.eval.val_dir)
    base = cfg.model.base
    folder = Path(base).expanduser()
    local = base != "micro" and (base.startswith(("/", ".", "~")) or folder.exists())
    if local and not (folder / "model_index.json").is_file() and not (folder / "unet").is_dir():
        raise ConfigError(f"model.base: {base} is not a diffusers pipeline folder (no model_index.json)")
    weights = cfg.eval.inception_weights
    if weights is not None and not Path(weights).expanduser().is_file():
        raise ConfigError(f"eval.inception_weights: no such file {weights}")
    if cfg.eval.features.startswith("clip:"):
        folder = Path(cfg.eval.features[5:]).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"eval.features: CLIP folder {folder} does not exist")
