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

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dallm.eval.extractor import (
    FeatureError,
    FeatureExtractor,
    list_images,
    load_image,
    pil_to_tensor,
    to_rgb,
)
from dallm.image.files import IMAGE_EXTS

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
        from dallm.eval.inception import inception_extractor  # loaded when asked (a large module)

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
