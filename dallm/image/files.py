"""Which files of a folder are images, and opening one: the one definition every loader and check
uses (PIL only, no torch, so the CLI's preflight stays cheap)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
# Files that commonly sit next to images and are not bad images.
IGNORED_EXTS = (".txt", ".json", ".toml", ".md", ".csv", ".caption")


class ImageFileError(ValueError):
    """A file with an image extension that cannot be used; the message is the reason (no path)."""


def image_files(folder: Path) -> list[Path]:
    """The image files of `folder` (by extension, hidden files left out), sorted by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")
    )


def unsupported_files(folder: Path) -> list[Path]:
    """Files of `folder` that are neither images nor known side files (captions, notes), sorted."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in IMAGE_EXTS + IGNORED_EXTS
    )


def open_rgb(path: Path, min_size: int = 1) -> Image.Image:
    """Open, fully decode and convert one image; ImageFileError says why it cannot be used."""
    try:
        with Image.open(path) as img:
            img.verify()  # catches truncated / corrupt files that open() alone accepts
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except UnidentifiedImageError:
        raise ImageFileError("not a readable image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageFileError(f"corrupt or unreadable ({e})") from None
    w, h = rgb.size
    if min(w, h) < min_size:
        raise ImageFileError(f"too small ({w}x{h}); the shorter side must be at least {min_size}")
    return rgb


__all__ = ["IGNORED_EXTS", "IMAGE_EXTS", "ImageFileError", "image_files", "open_rgb", "unsupported_files"]
