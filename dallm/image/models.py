"""Loading a Stable-Diffusion-format model: UNet, VAE, text encoder, tokenizer, noise scheduler.

`model.base` is "micro" (the miniature model shipped in the repository), a local diffusers folder,
or a hub id. Everything goes through diffusers' / transformers' `from_pretrained`; a hub id that
cannot be reached fails in one line that says to give a local folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dallm.config import ConfigError, ModelConfig
from dallm.preflight import resolve_base  # one rule for what model.base may be

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class ModelParts:
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer
    noise_scheduler: Any  # diffusers DDPMScheduler (training noise schedule)
    source: str  # the folder or hub id they came from

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.prediction_type)


def read_resolution(source: str, revision: str | None = None) -> int:
    """The model's native image size (UNet sample_size x VAE factor), read from the configs only."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.load_config(source, subfolder="unet", revision=revision)
        vae = AutoencoderKL.load_config(source, subfolder="vae", revision=revision)
    except (OSError, ValueError) as e:
        if Path(source).is_dir():
            raise ConfigError(f"model.base: cannot read {source}: {str(e).splitlines()[0][:200]}") from None
        raise _hub_error(source, e) from None
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _hub_error(base: str, err: Exception) -> ConfigError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(
        f"model.base: cannot load {base!r} from the model hub ({first[:160]}); "
        "give a local diffusers folder (e.g. one saved with save_pretrained) or 'micro'"
    )


def load_parts(
    cfg: ModelConfig,
    *,
    device: torch.device | str = "cpu",
    weight_dtype: torch.dtype = torch.float32,
) -> ModelParts:
    """Load the five parts with `from_pretrained`, frozen, on `device` in `weight_dtype`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    source = resolve_base(cfg.base)
    transformers_logging.disable_progress_bar()
    kw: dict[str, Any] = {"revision": cfg.revision, "torch_dtype": weight_dtype}
    try:
        # transformers logs a warning per missing optional file; keep the console quiet.
        logging.getLogger("transformers").setLevel(logging.ERROR)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=cfg.revision)
        text_encoder = CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", attn_implementation="sdpa", variant=cfg.variant, **kw
        )
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", variant=cfg.variant, **kw)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=cfg.variant, **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", revision=cfg.revision)
    except (OSError, ValueError) as e:
        if Path(source).is_dir():
            raise ConfigError(f"model.base: cannot load {source}: {str(e).splitlines()[0][:200]}") from None
        raise _hub_error(source, e) from None
    if cfg.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
    unet.set_attn_processor(AttnProcessor2_0())  # PyTorch SDPA
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.to(device=device)
    vae.eval()
    text_encoder.eval()
    return ModelParts(unet, vae, text_encoder, tokenizer, noise_scheduler, source)
