"""The feature extractor's frame, shared by every network: image handling (any mode to RGB, a
centre-cropped square) and `FeatureExtractor`, which batches images of one side through a network.

`dallm.eval.features` loads the networks (`load_extractor`); `dallm.eval.inception` is one of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dallm.image.files import IMAGE_EXTS, image_files


class FeatureError(ValueError):
    """A feature extractor or an image that cannot be used; the message is one line."""


# ----------------------------------------------------------------------------------------------
# Images


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB version of an image of any mode (alpha composited over white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0
        elif img.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def _square(img: Image.Image) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def pil_to_tensor(img: Image.Image) -> Tensor:
    """[3, S, S] float tensor in [0, 1]: RGB, centre-cropped to a square."""
    arr = np.asarray(_square(to_rgb(img)), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def list_images(folder: str | Path) -> list[Path]:
    """The image files (png, jpg, jpeg, webp) of a folder, sorted by name; errors name the folder."""
    folder = Path(folder)
    if not folder.exists():
        raise FeatureError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise FeatureError(f"{folder}: not a folder")
    files = image_files(folder)
    if not files:
        raise FeatureError(f"{folder}: no images ({', '.join(e[1:] for e in IMAGE_EXTS)})")
    return files


def load_image(path: str | Path) -> Image.Image:
    """An image file, fully decoded; an unreadable file raises FeatureError naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except Exception as e:
        raise FeatureError(
            f"{path}: cannot read image ({type(e).__name__}: {e})".replace("\n", " ")
        ) from None


# ----------------------------------------------------------------------------------------------
# The extractor


class FeatureExtractor:
    """A feature network with its input handling. `net` maps float [N, 3, H, W] in [0, 1] to [N, D]."""

    def __init__(
        self,
        name: str,
        net: Callable[[Tensor], Tensor],
        dim: int,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        self.name = name
        self.net = net
        self.dim = int(dim)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)

    def __repr__(self) -> str:
        return f"FeatureExtractor({self.name!r}, dim={self.dim}, device={str(self.device)!r})"

    @torch.no_grad()
    def _run(self, x: Tensor) -> Tensor:
        out = []
        for i in range(0, len(x), self.batch_size):
            batch = x[i : i + self.batch_size].to(self.device, torch.float32)
            out.append(torch.as_tensor(self.net(batch)).detach().float().reshape(len(batch), -1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.dim)

    def __call__(self, images: Tensor | Sequence[Image.Image]) -> Tensor:
        if isinstance(images, Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise FeatureError(f"{self.name}: expected images [N, 3, H, W], got {tuple(images.shape)}")
            return self._run(images)
        tensors = [pil_to_tensor(im) for im in images]
        if not tensors:
            return torch.empty(0, self.dim)
        feats: list[Tensor | None] = [None] * len(tensors)
        by_side: dict[int, list[int]] = {}
        for i, t in enumerate(tensors):
            by_side.setdefault(t.shape[-1], []).append(i)
        for idx in by_side.values():
            out = self._run(torch.stack([tensors[i] for i in idx]))
            for k, i in enumerate(idx):
                feats[i] = out[k]
        return torch.stack(feats)  # type: ignore[arg-type]
