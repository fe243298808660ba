"""A repeatable validation loss for diffusion models: the training objective on held-out images at
fixed timesteps and fixed noise, the same at every evaluation.

The training loss is noisy (a random timestep and noise per image per step), so its trend says little
about one checkpoint. Here every evaluation uses the same held-out latents (the VAE's mean, not a
sample), the same timesteps (kohya's sd-scripts PR #1856: 10, 350, 500, 650 and 990 of 1,000, scaled
to the scheduler's `num_train_timesteps`) and the same noise (drawn on the CPU from one seed), and the
model's own objective (`dallm.image.trainer.diffusion_target`: epsilon or v-prediction, the training
loss's target). Same weights -> the same value, bit for bit (on one device, with the same batch size).

Returned per timestep and as their mean: low timesteps measure detail, high ones composition; a
LoRA that memorises its images lowers the held-out loss at none of them. For LLM jobs the held-out
loss is `ppl_val` (dallm.llm.evaluation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dallm.config import VAL_LOSS_TIMESTEPS
from dallm.image.sampling import encode_prompts, sampling_mode
from dallm.image.trainer import diffusion_target

KOHYA_TIMESTEPS = (
    VAL_LOSS_TIMESTEPS  # of 1,000 training timesteps (sd-scripts PR #1856); eval.val_loss_timesteps
)
VAL_NOISE_SEED = 1856


@dataclass(frozen=True)
class ValLoss:
    per_timestep: dict[int, float]  # timestep -> mean squared error over the held-out images
    mean: float  # the mean over the timesteps

    def values(self) -> dict[str, float]:
        """As metric values: `val_loss` and `val_loss_t<timestep>`."""
        return {"val_loss": self.mean, **{f"val_loss_t{t}": v for t, v in self.per_timestep.items()}}


def fixed_timesteps(num_train_timesteps: int, at: Sequence[int] = KOHYA_TIMESTEPS) -> list[int]:
    """`at` (timesteps of a 1,000-step schedule) scaled to `num_train_timesteps`, distinct, in range."""
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    scaled = (min(num_train_timesteps - 1, max(0, round(t * num_train_timesteps / 1000))) for t in at)
    return list(dict.fromkeys(scaled))


def fixed_noise(shape: Sequence[int], num_timesteps: int, seed: int = VAL_NOISE_SEED) -> Tensor:
    """[num_timesteps, *shape] standard normal noise from one CPU generator: the same on every device."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((num_timesteps, *shape), generator=gen)


@torch.no_grad()
def encode_latents(vae: Any, pixels: Tensor, batch_size: int = 16) -> Tensor:
    """Latents of images [N, 3, H, W] in [-1, 1] (as `dallm.image.data.ImageSet` holds them, as the
    trainer encodes them): the VAE posterior's mean (no sampling: repeatable) x the VAE's scale."""
    dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    out = []
    for i in range(0, len(pixels), batch_size):
        x = pixels[i : i + batch_size].to(device, dtype)
        out.append(vae.encode(x).latent_dist.mean.float().cpu() * vae.config.scaling_factor)
    return torch.cat(out)


def validation_loss(
    unet: Any,
    scheduler: Any,
    latents: Tensor,
    hidden: Tensor,
    timesteps: Sequence[int] | None = None,
    seed: int = VAL_NOISE_SEED,
    batch_size: int = 16,
) -> ValLoss:
    """The objective of `unet` on `latents` [N, C, h, w] with text states `hidden` [N, L, D].

    `timesteps`: None is `fixed_timesteps(scheduler.config.num_train_timesteps)`. The unet is put in
    eval mode (no LoRA dropout) for the measure and given back as it was; the RNGs are not touched.
    """
    if len(latents) != len(hidden):
        raise ValueError(f"validation loss: {len(latents)} latents and {len(hidden)} text states")
    if len(latents) == 0:
        raise ValueError("validation loss: no held-out images")
    ts = list(timesteps) if timesteps is not None else fixed_timesteps(scheduler.config.num_train_timesteps)
    noise = fixed_noise(latents.shape, len(ts), seed)
    param = next(unet.parameters())
    out: dict[int, float] = {}
    with sampling_mode(unet):
        for k, t in enumerate(ts):
            total = 0.0
            for i in range(0, len(latents), batch_size):
                lat = latents[i : i + batch_size].float()
                eps = noise[k, i : i + batch_size]
                tt = torch.full((len(lat),), int(t), dtype=torch.long)
                noisy = scheduler.add_noise(lat, eps, tt)
                target = diffusion_target(scheduler, lat, eps, tt)
                pred = unet(
                    noisy.to(param.device, param.dtype),
                    tt.to(param.device),
                    hidden[i : i + batch_size].to(param.device, param.dtype),
                    return_dict=False,
                )[0]
                # Sum of per-image errors, so that the mean does not depend on the batch size's split.
                err = F.mse_loss(pred.float().cpu(), target.float(), reduction="none").flatten(1).mean(1)
                total += float(err.double().sum())
            out[int(t)] = total / len(latents)
    return ValLoss(out, sum(out.values()) / len(out))


def image_validation_loss(
    parts: Any,
    pixels: Tensor,
    captions: Sequence[str],
    timesteps: Sequence[int] | None = None,
    seed: int = VAL_NOISE_SEED,
    batch_size: int = 16,
) -> ValLoss:
    """`validation_loss` of held-out images [N, 3, H, W] in [-1, 1] with their captions, through `parts`
    (a ModelParts: vae, text_encoder, tokenizer, unet, noise_scheduler). Callers that evaluate often
    encode the latents once (`encode_latents`) and call `validation_loss`."""
    if len(pixels) != len(captions):
        raise ValueError(f"validation loss: {len(pixels)} images and {len(captions)} captions")
    latents = encode_latents(parts.vae, pixels, batch_size)
    device = next(parts.text_encoder.parameters()).device
    with sampling_mode(parts.text_encoder):
        hidden = torch.cat(
            [
                encode_prompts(parts, captions[i : i + batch_size], device)
                for i in range(0, len(captions), batch_size)
            ]
        )
    return validation_loss(parts.unet, parts.noise_scheduler, latents, hidden, timesteps, seed, batch_size)


__all__ = [
    "KOHYA_TIMESTEPS",
    "VAL_NOISE_SEED",
    "ValLoss",
    "encode_latents",
    "fixed_noise",
    "fixed_timesteps",
    "image_validation_loss",
    "validation_loss",
]
