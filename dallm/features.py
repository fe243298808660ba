"""Feature extractors for KID: `micro`, `inception` and `clip:FOLDER`.

`load_extractor(spec)` returns a `FeatureExtractor`: call it on a list of PIL images (any size, any
mode) or on a float tensor [N, 3, H, W] in [0, 1]; it returns float32 features [N, D] on the CPU.

- `micro`: the micro world's feature net (`dallm.micro.load_feature_net`), 128-d.
- `inception`: Inception-v3 as torch-fidelity defines it for FID/KID (the TF 2015-12-05 graph,
  2048-d pool features), implemented here with plain torch; it loads torch-fidelity's converted
  weights file `weights-inception-2015-12-05-6726825d.pth` from the torch hub cache (where
  torch-fidelity saves it) or from a given path. Nothing is ever downloaded, and torch-fidelity need
  not be installed. Input handling follows torch-fidelity: 8-bit RGB values, TF1-style bilinear
  resize to 299 x 299, then (x - 128) / 128.
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

from dallm.imagefiles import IMAGE_EXTS, image_files

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_NAME}"
)
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
        return _inception(device, inception_weights, batch_size)
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
# Inception-v3 (torch-fidelity's / TF's FID network)


class _BasicConv(nn.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: Tensor) -> Tensor:
    # TF's average pooling ignores the zero padding.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):  # 35 x 35
    def __init__(self, cin: int, pool: int) -> None:
        super().__init__()
        self.branch1x1 = _BasicConv(cin, 64, 1)
        self.branch5x5_1 = _BasicConv(cin, 48, 1)
        self.branch5x5_2 = _BasicConv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _BasicConv(cin, 64, 1)
        self.branch3x3dbl_2 = _BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _BasicConv(96, 96, 3, padding=1)
        self.branch_pool = _BasicConv(cin, pool, 1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)


class _ReduceA(nn.Module):  # 35 -> 17
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _BasicConv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _BasicConv(cin, 64, 1)
        self.branch3x3dbl_2 = _BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _BasicConv(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class _MixedB(nn.Module):  # 17 x 17, factorised 7x7
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = _BasicConv(cin, 192, 1)
        self.branch7x7_1 = _BasicConv(cin, c7, 1)
        self.branch7x7_2 = _BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _BasicConv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _BasicConv(cin, c7, 1)
        self.branch7x7dbl_2 = _BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _BasicConv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _BasicConv(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class _ReduceB(nn.Module):  # 17 -> 8
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = _BasicConv(cin, 192, 1)
        self.branch3x3_2 = _BasicConv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _BasicConv(cin, 192, 1)
        self.branch7x7x3_2 = _BasicConv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _BasicConv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _BasicConv(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class _MixedC(nn.Module):  # 8 x 8, expanded filter bank; the TF graph max-pools in the last one
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _BasicConv(cin, 320, 1)
        self.branch3x3_1 = _BasicConv(cin, 384, 1)
        self.branch3x3_2a = _BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _BasicConv(cin, 448, 1)
        self.branch3x3dbl_2 = _BasicConv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _BasicConv(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


def resize_bilinear_tf1(x: Tensor, size: int) -> Tensor:
    """TensorFlow 1.x bilinear resize (align_corners=False, no half-pixel centres) of [N, C, H, W]."""

    def axis(n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        src = torch.arange(size, dtype=torch.float32, device=x.device) * (n_in / size)
        lo = src.floor().long().clamp_max(n_in - 1)
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo, hi, (src - lo.float()).to(x.dtype)

    ylo, yhi, dy = axis(x.shape[2])
    xlo, xhi, dx = axis(x.shape[3])
    top, bottom = x[:, :, ylo, :], x[:, :, yhi, :]
    rows = top + (bottom - top) * dy.view(1, 1, -1, 1)
    left, right = rows[:, :, :, xlo], rows[:, :, :, xhi]
    return left + (right - left) * dx.view(1, 1, 1, -1)


class InceptionV3(nn.Module):
    """Inception-v3 with the module names of torch-fidelity's weights file; forward -> 2048-d pool features."""

    INPUT_SIZE = 299

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _BasicConv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _BasicConv(32, 32, 3)
        self.Conv2d_2b_3x3 = _BasicConv(32, 64, 3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(3, stride=2)
        self.Conv2d_3b_1x1 = _BasicConv(64, 80, 1)
        self.Conv2d_4a_3x3 = _BasicConv(80, 192, 3)
        self.MaxPool_2 = nn.MaxPool2d(3, stride=2)
        self.Mixed_5b = _MixedA(192, 32)
        self.Mixed_5c = _MixedA(256, 64)
        self.Mixed_5d = _MixedA(288, 64)
        self.Mixed_6a = _ReduceA(288)
        self.Mixed_6b = _MixedB(768, 128)
        self.Mixed_6c = _MixedB(768, 160)
        self.Mixed_6d = _MixedB(768, 160)
        self.Mixed_6e = _MixedB(768, 192)
        self.Mixed_7a = _ReduceB(768)
        self.Mixed_7b = _MixedC(1280, max_pool=False)
        self.Mixed_7c = _MixedC(2048, max_pool=True)
        self.AvgPool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, 1008)  # in the weights file; unused for KID features

    def forward(self, x: Tensor) -> Tensor:
        """x: float [N, 3, H, W] in [0, 1] -> [N, 2048]."""
        x = torch.round(x.clamp(0, 1) * 255)  # torch-fidelity's input is 8-bit RGB
        x = resize_bilinear_tf1(x, self.INPUT_SIZE)
        x = (x - 128) / 128
        for name in (
            "Conv2d_1a_3x3",
            "Conv2d_2a_3x3",
            "Conv2d_2b_3x3",
            "MaxPool_1",
            "Conv2d_3b_1x1",
            "Conv2d_4a_3x3",
            "MaxPool_2",
        ):
            x = getattr(self, name)(x)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return torch.flatten(self.AvgPool(x), 1)


def default_inception_weights() -> Path:
    """Where torch-fidelity caches the weights file: <torch hub dir>/checkpoints/<name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME


def _inception(device: str | torch.device, weights: Path | str | None, batch_size: int) -> FeatureExtractor:
    path = Path(weights).expanduser() if weights is not None else default_inception_weights()
    if not path.is_file():
        raise FeatureError(
            f"inception features: weights file {path} not found; put {INCEPTION_WEIGHTS_NAME} "
            f"(from {INCEPTION_WEIGHTS_URL}, or let torch-fidelity fetch it: pip install 'dallm[inception]') "
            f"at {default_inception_weights()} or give its path (eval.inception_weights / --inception-weights)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FeatureError(
            f"inception features: cannot load {path} ({type(e).__name__}: {e})".replace("\n", " ")
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    net = InceptionV3()
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except Exception as e:
        raise FeatureError(
            f"inception features: {path} is not torch-fidelity's Inception-v3 ({e})".replace("\n", " ")
        ) from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise FeatureError(f"inception features: {path} is not torch-fidelity's Inception-v3 ({what})")
    net = net.to(device).eval().requires_grad_(False)
    return FeatureExtractor("inception", net, 2048, device, batch_size)


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
    "InceptionV3",
    "default_inception_weights",
    "features_of_folder",
    "list_images",
    "load_extractor",
    "load_image",
    "pil_to_tensor",
    "resize_bilinear_tf1",
    "to_rgb",
]
