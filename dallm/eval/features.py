"""Feature extractors for KID: `micro`, `inception` and `clip:FOLDER`.

`load_extractor(spec)` returns a `FeatureExtractor`: call it on a list of PIL images (any size, any
mode) or on a float tensor [N, 3, H, W] in [0, 1]; it returns float32 features [N, D] on the CPU.

- `micro`: the micro world's feature net (`dallm.micro.load_feature_net`), 128-d.
- `inception`: Inception-v3 as torch-fidelity defines it for FID/KID, 2048-d, from a local weights
  file, never downloaded (`dallm/eval/inception.py`).
- `clip:FOLDER`: a local CLIP vision model (transformers `CLIPVisionModelWithProjection`), its
  projected image embedding; preprocessing from the folder's preprocessor config when present.

Images: every PIL image is converted to RGB (transparency composited over white, 16-bit grayscale
scaled to 8 bits) and centre-cropped to a square; square images of the same side are batched
together and each extractor resizes them inside its network, so an image's features do not depend
on the batch it came in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from dallm.image.files import IMAGE_EXTS, image_files

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


def features_of_folder(
    extractor: FeatureExtractor, folder: str | Path, batch_size: int | None = None
) -> Tensor:
    """Features [N, D] of every image of a folder (sorted by name), read `batch_size` files at a time."""
    files = list_images(folder)
    bs = batch_size or max(extractor.batch_size, 1)
    out = []
    for i in range(0, len(files), bs):
        out.append(extractor([load_image(p) for p in files[i : i + bs]]))
    return torch.cat(out)


def load_extractor(
    spec: str,
    device: str | torch.device = "cpu",
    inception_weights: Path | str | None = None,
    batch_size: int = 32,
) -> FeatureExtractor:
    """`micro`, `inception` or `clip:FOLDER` (EvalConfig.features)."""
    if spec == "micro":
        return _micro(device, batch_size)
    if spec == "inception":
        from dallm.eval.inception import inception_extractor  # imports this module: loaded when asked

        return inception_extractor(device, inception_weights, batch_size)
    if spec.startswith("clip:") and len(spec) > 5:
        return _clip(Path(spec[5:]).expanduser(), device, batch_size)
    raise FeatureError(f"unknown feature extractor {spec!r}; use micro, inception or clip:FOLDER")


# ----------------------------------------------------------------------------------------------
# micro


def _micro(device: str | torch.device, batch_size: int) -> FeatureExtractor:
    try:
        from dallm.micro import load_feature_net
    except ImportError as e:
        raise FeatureError(f"micro features: dallm.micro.load_feature_net is not available ({e})") from None
    try:
        net = load_feature_net(device)
    except FileNotFoundError as e:
        raise FeatureError(
            f"micro features: the feature net is missing ({e}); rebuild it with `dallm micro build`"
        ) from None
    dim = int(getattr(net, "feature_dim", 0)) or int(net(torch.zeros(1, 3, 32, 32, device=device)).shape[1])
    return FeatureExtractor("micro", net, dim, device, batch_size)


# ----------------------------------------------------------------------------------------------
# CLIP


class _ClipNet(nn.Module):
    def __init__(self, model: nn.Module, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.size = size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h != w:
            s = min(h, w)
            top, left = (h - s) // 2, (w - s) // 2
            x = x[..., top : top + s, left : left + s]
        if x.shape[-1] != self.size:
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False
            )
        x = (x.clamp(0, 1) - self.mean) / self.std
        return self.model(pixel_values=x).image_embeds


def _clip(folder: Path, device: str | torch.device, batch_size: int) -> FeatureExtractor:
    if not folder.is_dir():
        raise FeatureError(
            f"clip features: {folder}: no such folder (a local CLIP model saved with save_pretrained)"
        )
    from transformers import CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise FeatureError(
            f"clip features: cannot load a CLIP vision model from {folder} ({type(e).__name__}: {e})".replace(
                "\n", " "
            )
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    size, mean, std = int(model.config.image_size), CLIP_MEAN, CLIP_STD
    if (folder / "preprocessor_config.json").is_file():
        import json

        try:
            pre = json.loads((folder / "preprocessor_config.json").read_text())
            mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
            crop = pre.get("crop_size", size)
            size = int(crop.get("height", size) if isinstance(crop, dict) else crop)
        except (ValueError, OSError, TypeError, AttributeError):
            pass
    net = _ClipNet(model, size, mean, std).to(device).eval().requires_grad_(False)
    dim = int(getattr(model.config, "projection_dim", 0) or model.config.hidden_size)
    return FeatureExtractor(f"clip:{folder}", net, dim, device, batch_size)


__all__ = [
    "FeatureError",
    "FeatureExtractor",
    "IMAGE_EXTS",
    "features_of_folder",
    "list_images",
    "load_extractor",
    "load_image",
    "pil_to_tensor",
    "to_rgb",
]
