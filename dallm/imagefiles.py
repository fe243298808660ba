"""Which files of a folder are images: the one definition every loader and check uses (no torch)."""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def image_files(folder: Path) -> list[Path]:
    """The image files of `folder` (by extension, hidden files left out), sorted by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")
    )


__all__ = ["IMAGE_EXTS", "image_files"]
