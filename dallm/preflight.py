"""The one preflight every way of starting a job runs: `dallm submit`, `dallm run`, `dallm train`,
`dallm sweep` (every grid value, also with `--dry-run`) and the daemon's submit handler (for
clients that are not our CLI). A job it passes can load its data and model; one it refuses is
refused in one line naming the key or file and the reason, before anything is queued.

What it checks, without loading any weights (it reads the model's config JSON files and opens
every image the job would use, which for this project's 5-50 images takes milliseconds):
- `model.base`: "micro", an existing local diffusers folder, or a hub id (`org/name`);
- sizes: `model.resolution` fits the UNet's downsampling, `lora.rank` (and the text encoder's)
  is no wider than the layers it adapts;
- `data.dir` / `data.class_dir`: exist, hold images, list no unsupported files (unless
  `data.on_bad_image = "skip"`), every image used decodes and is large enough, and each has a
  caption when there is no `data.instance_prompt`; at least `data.limit` usable images;
- `eval.val_dir`: at least 2 images that decode; the Inception weights file or CLIP folder;
- upper bounds (issue 25): `train.steps`, `train.batch_size`, `model.resolution`, and the batch's
  activation memory, estimated from the model's width and the image side, against this machine's.

A relative `model.base` that is no `./path` is a hub id, wherever the process runs: whether a folder
of that name exists in the current directory never decides it (the daemon's is not the client's).
`check_hub` (the daemon's submit) refuses a hub id that cannot be fetched: not in the local cache
while offline (HF_HUB_OFFLINE, or the hub's host cannot be resolved), with the cause.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dallm.config import HUB_ID, ConfigError, JobConfig, key_error, load_config
from dallm.image.files import IMAGE_EXTS, ImageFileError, image_files, open_rgb, unsupported_files

__all__ = ["ModelShape", "PreflightError", "check_hub", "checked_config", "model_shape", "preflight",
           "resolve_base"]  # fmt: skip


class PreflightError(ConfigError):
    """A job that would fail when it runs; `key` is the config key, the message one line."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}", key, reason)


def _names(paths: list[Path], most: int = 5) -> str:
    shown = ", ".join(p.name for p in paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


# -- the model ------------------------------------------------------------------------------------


def resolve_base(base: str) -> str:
    """ "micro" -> the shipped micro model folder; a folder -> its absolute path; else the hub id."""
    if base == "micro":
        try:
            from dallm.micro import MODEL_DIR
        except ImportError:
            raise PreflightError("model.base", "the micro model is not in this installation") from None
        if not (Path(MODEL_DIR) / "unet").is_dir():
            raise PreflightError(
                "model.base",
                f"micro model folder {MODEL_DIR} is missing; rebuild it with `dallm micro build`",
            )
        return str(MODEL_DIR)
    path = Path(base).expanduser()
    local = path.is_absolute() or base.startswith((".", "~"))  # else a hub id, whatever the cwd holds
    if local and path.exists():
        if not path.is_dir() or not (path / "unet").is_dir():
            raise PreflightError("model.base", f"{path} is not a diffusers model folder (no unet/ subfolder)")
        return str(path.resolve())
    if local or base.count("/") > 1:
        raise PreflightError(
            "model.base", f"folder {base} does not exist; give 'micro', a diffusers folder or a hub id"
        )
    if not HUB_ID.fullmatch(base):
        raise PreflightError("model.base", f"{base!r} is neither 'micro', a folder nor a hub id (org/name)")
    return base


@dataclass(frozen=True)
class ModelShape:
    """What the model's config files say about sizes; None where unknown (a hub id: not read)."""

    source: str
    resolution: int | None = None  # native image side (UNet sample_size x VAE factor)
    multiple: int | None = None  # an image side must be a multiple of this (VAE x UNet downsampling)
    unet_width: int | None = None  # the narrowest width of the UNet's attention projections
    text_width: int | None = None  # the text encoder's hidden size


def _json(folder: Path, part: str) -> dict[str, Any] | None:
    path = folder / part / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PreflightError("model.base", f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise PreflightError("model.base", f"{path}: not a JSON object")
    return data


def model_shape(base: str) -> ModelShape:
    source = resolve_base(base)
    folder = Path(source)
    if not folder.is_absolute():  # a hub id: nothing to read without the hub
        return ModelShape(source)
    unet, vae, text = _json(folder, "unet"), _json(folder, "vae"), _json(folder, "text_encoder")
    try:
        widths = list(unet["block_out_channels"]) if unet else []
        cross = unet.get("cross_attention_dim") if unet else None
        widths += [cross] if isinstance(cross, int) else []
        vae_factor = 2 ** (len(vae["block_out_channels"]) - 1) if vae else None
        resolution = int(unet["sample_size"]) * vae_factor if unet and vae_factor else None
        multiple = vae_factor * 2 ** (len(unet["block_out_channels"]) - 1) if unet and vae_factor else None
        text_width = int(text["hidden_size"]) if text and "hidden_size" in text else None
    except (KeyError, TypeError, ValueError) as e:
        raise PreflightError("model.base", f"{folder}: unexpected unet/vae config ({e!r})") from None
    return ModelShape(source, resolution, multiple, min(widths) if widths else None, text_width)


def _check_sizes(cfg: JobConfig, shape: ModelShape) -> int | None:
    """Refuse sizes the model cannot take; returns the image side the job will use (None: unknown)."""
    resolution = cfg.model.resolution or shape.resolution
    if cfg.model.resolution is not None and shape.multiple and cfg.model.resolution % shape.multiple:
        raise PreflightError(
            "model.resolution",
            f"{cfg.model.resolution} is not a multiple of {shape.multiple} (the model's VAE and UNet "
            "downsampling)",
        )
    if cfg.train.method == "lora" and shape.unet_width and cfg.lora.rank > shape.unet_width:
        raise PreflightError(
            "lora.rank",
            f"{cfg.lora.rank} is wider than the model's narrowest attention layers ({shape.unet_width}); "
            f"use at most {shape.unet_width}",
        )
    te_rank = cfg.lora.text_encoder_rank or cfg.lora.rank
    if cfg.lora.text_encoder and shape.text_width and te_rank > shape.text_width:
        key = "lora.text_encoder_rank" if cfg.lora.text_encoder_rank else "lora.rank"
        raise PreflightError(
            key,
            f"{te_rank} is wider than the text encoder ({shape.text_width}); use at most {shape.text_width}",
        )
    return resolution


MAX_STEPS = 10**9
MAX_BATCH = 65_536
MAX_RESOLUTION = 4096  # or 4x the model's native side, if larger
# Activation bytes per image pixel per channel of the UNet's narrowest level, forward and backward:
# an order of magnitude (SD 1.5, 512 px, width 320: about 0.6 GiB an image), enough to refuse the
# absurd (batch_size 10**9) long before a worker sits at step 0 growing its memory.
ACTIVATION_BYTES = 8
DEFAULT_WIDTH = 320  # a hub model's, unread
SHIPPED = ("micro", "micro-llm")  # the models in this installation (dallm.llm.data.MICRO_LLM: no import)


def machine_memory() -> int:
    """This machine's RAM in bytes (0 when unknown: no memory bound)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 0


def check_bounds(cfg: JobConfig, shape: ModelShape | None, resolution: int | None) -> None:
    """Upper bounds of the sizes a job asks for (one line each)."""
    if cfg.train.steps > MAX_STEPS:
        raise PreflightError("train.steps", f"{cfg.train.steps} is more than {MAX_STEPS}")
    if cfg.train.batch_size > MAX_BATCH:
        raise PreflightError("train.batch_size", f"{cfg.train.batch_size} is more than {MAX_BATCH}")
    if shape is None:
        return
    most = max(MAX_RESOLUTION, 4 * (shape.resolution or 0))
    if resolution is not None and resolution > most:
        raise PreflightError(
            "model.resolution", f"{resolution} is more than {most} (4x the model's own side or 4096)"
        )
    side, memory = resolution or shape.resolution or 512, machine_memory()
    need = cfg.train.batch_size * side * side * (shape.unet_width or DEFAULT_WIDTH) * ACTIVATION_BYTES
    if memory and need > memory:
        raise PreflightError(
            "train.batch_size",
            f"{cfg.train.batch_size} images of {side} px need about {need / 2**30:,.0f} GiB of activations "
            f"(the preflight's estimate); this machine has {memory / 2**30:,.0f} GiB",
        )


def check_hub(base: str) -> None:
    """A hub id the job would download: refused (one line, the cause) when it is not in the local
    cache and cannot be fetched: HF_HUB_OFFLINE is set, or the hub's host does not resolve."""
    if base in SHIPPED or base.startswith((".", "/", "~")) or not HUB_ID.fullmatch(base):
        return
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    for name in ("model_index.json", "config.json"):
        if isinstance(try_to_load_from_cache(base, name), str):
            return
    where = f"not in the local Hugging Face cache ({constants.HF_HUB_CACHE})"
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise PreflightError("model.base", f"hub id {base!r} is {where} and HF_HUB_OFFLINE is set")
    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        raise PreflightError(
            "model.base", f"hub id {base!r} is {where} and {host} cannot be reached ({e.strerror or e})"
        ) from None


# -- images ---------------------------------------------------------------------------------------


def _folder(key: str, value: Path) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise PreflightError(key, f"folder {path} does not exist; fill it or pass --set {key}=FOLDER")
    if not path.is_dir():
        raise PreflightError(key, f"{path} is not a folder; pass --set {key}=FOLDER")
    return path


def _check_images(
    key: str,
    value: Path | None,
    cfg: JobConfig,
    min_size: int,
    *,
    limit: int | None = None,
    prompt: str | None = None,
    need: int = 1,
    strict_files: bool = True,
) -> None:
    """The images a job would use from folder `value`: each decodes, is large enough and (when
    `prompt` is "") has a caption. `strict_files`: unsupported files are refused as the loader does."""
    if value is None:
        return
    folder = _folder(key, value)
    skip = cfg.data.on_bad_image == "skip"
    other = unsupported_files(folder) if strict_files and not skip else []
    if other:
        raise PreflightError(
            key,
            f"unsupported file(s) in {folder}: {_names(other)}; use {', '.join(IMAGE_EXTS)}, remove them "
            'or set data.on_bad_image = "skip"',
        )
    files = image_files(folder)
    if not files:
        raise PreflightError(
            key, f"no images ({', '.join(IMAGE_EXTS)}) in {folder}; fill it or pass --set {key}=FOLDER"
        )
    usable = 0
    for path in files:
        if limit is not None and usable >= limit:
            break
        try:
            open_rgb(path, min_size)
        except ImageFileError as e:
            if skip:
                continue
            raise PreflightError(key, f"{path}: {e}") from None
        if prompt == "":
            caption = path.with_suffix(cfg.data.caption_ext)
            if not caption.is_file() or not caption.read_text(encoding="utf-8", errors="replace").strip():
                raise PreflightError(
                    "data.instance_prompt",
                    f"empty, and {path} has no {caption.name} caption; write one or set data.instance_prompt",
                )
        usable += 1
    if usable < need:
        bad = f" ({len(files) - usable} unusable)" if usable < len(files) else ""
        why = f"fewer than data.limit={need}" if key == "data.dir" and cfg.data.limit else f"{need} needed"
        raise PreflightError(key, f"{folder} has {usable} usable images{bad}, {why}")


def preflight(cfg: JobConfig) -> None:
    """Raise PreflightError (one line, naming the key or file) when `cfg` could not run."""
    if cfg.model.kind == "llm":
        check_bounds(cfg, None, None)
        from dallm.llm.data import preflight_llm

        try:
            preflight_llm(cfg)
        except ConfigError as e:
            raise PreflightError(e.key or "model", e.reason or str(e)) from None
        return
    shape = model_shape(cfg.model.base)
    resolution = _check_sizes(cfg, shape)
    check_bounds(cfg, shape, resolution)
    min_size = cfg.data.min_size or max(1, (resolution or 2) // 2)
    _check_images("data.dir", cfg.data.dir, cfg, min_size,
                  limit=cfg.data.limit, prompt=cfg.data.instance_prompt, need=cfg.data.limit or 1)  # fmt: skip
    _check_images("data.class_dir", cfg.data.class_dir, cfg, min_size)
    # Evaluation reads every image of val_dir and ignores other files; KID needs 2 or more.
    _check_images("eval.val_dir", cfg.eval.val_dir, cfg, 1, need=2, strict_files=False)
    weights = cfg.eval.inception_weights
    if weights is not None and not Path(weights).expanduser().is_file():
        raise PreflightError("eval.inception_weights", f"no such file {weights}")
    if cfg.eval.features.startswith("clip:"):
        folder = Path(cfg.eval.features[5:]).expanduser()
        if not folder.is_dir():
            raise PreflightError("eval.features", f"CLIP folder {folder} does not exist")


def checked_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """`load_config` then `preflight`; an error names the `--set` item that gave the key its value,
    else the config file."""
    cfg = load_config(path, overrides)
    try:
        preflight(cfg)
    except PreflightError as e:
        raise key_error(e.key or "", e.reason or str(e), str(path), overrides) from None
    return cfg
