"""Deterministic sampling from a model being trained: fixed prompts x fixed initial noise.

The training loop's modules (UNet with LoRA, VAE, text encoder, tokenizer, noise scheduler) are
used as they are, without building a pipeline: a DDIM scheduler (eta = 0, so no noise is drawn
while denoising) is made from the noise scheduler's config, the initial latents come from CPU
generators seeded per image, and classifier-free guidance uses the empty prompt. The same weights
and the same seeds therefore give the same images, at every step and on every device.

`sampling_mode` puts the modules in eval mode under no_grad and leaves the global RNGs untouched
(resume determinism of the training loop); `adapters_disabled` turns LoRA off for base-model
samples and restores every adapter and `requires_grad` flag exactly afterwards.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image


class ModelLike(Protocol):
    """What sampling needs of `dallm.image.models.ModelParts` (duck-typed, so tests can pass a namespace)."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any


@dataclass(frozen=True)
class SamplerSettings:
    steps: int = 25
    guidance: float = 5.0
    batch_size: int = 16
    resolution: int | None = None  # pixels; None: the UNet's sample_size x the VAE factor


# ---------------------------------------------------------------------------------------------
# Modes


@contextlib.contextmanager
def sampling_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no_grad for `modules`; their training flags and the global RNGs are restored."""
    was_training = [(m, m.training) for m in modules if m is not None]
    devices = (
        [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    )
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        for m, _ in was_training:
            m.eval()
        try:
            yield
        finally:
            for m, flag in was_training:
                m.train(flag)


@contextlib.contextmanager
def adapters_disabled(*modules: torch.nn.Module) -> Iterator[None]:
    """Turn off every peft adapter layer inside `modules` (the base model), then restore exactly.

    peft's `enable_adapters(True)` sets `requires_grad` on the active adapters, which would unfreeze
    a LoRA the engine keeps frozen (for example during textual-inversion-only steps), so every
    parameter's flag is saved and put back as well.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers: list[tuple[Any, bool]] = []
    grads: list[tuple[torch.nn.Parameter, bool]] = []
    for module in modules:
        if module is None:
            continue
        grads += [(p, p.requires_grad) for p in module.parameters()]
        layers += [(m, bool(m.disable_adapters)) for m in module.modules() if isinstance(m, BaseTunerLayer)]
    try:
        for layer, _ in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer, was_disabled in layers:
            layer.enable_adapters(not was_disabled)
        for p, flag in grads:
            p.requires_grad_(flag)


def strip_tokens(prompt: str, tokens: Sequence[str], replacement: str = "") -> str:
    """The prompt for the base model, which does not know the learned tokens: each run of them
    ("<s1><s2>", "<s1> <s2>") becomes `replacement` (the word they were initialised from) or goes."""
    if not tokens:
        return prompt
    tok = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    prompt = re.sub(rf"(?:{tok})(?:\s*(?:{tok}))*", f" {replacement} ", prompt)
    return re.sub(r"\s+", " ", prompt).strip()


# ---------------------------------------------------------------------------------------------
# Noise, text, denoising


def vae_factor(vae: Any) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_shape(parts: ModelLike, resolution: int | None = None) -> tuple[int, int, int]:
    factor = vae_factor(parts.vae)
    size = resolution // factor if resolution else int(parts.unet.config.sample_size)
    return (int(parts.unet.config.in_channels), size, size)


def initial_latents(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """One [C,H,W] standard-normal tensor per seed, drawn on the CPU (the same on every device)."""
    out = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(out) if out else torch.empty((0, *shape))


def encode_prompts(parts: ModelLike, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    tok = parts.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=parts.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return parts.text_encoder(tok.input_ids.to(device))[0]


def make_scheduler(noise_scheduler: Any) -> Any:
    """A deterministic DDIM scheduler with the training scheduler's betas and prediction type."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(noise_scheduler.config)


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    if dtype == torch.float32 or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _denoise_batch(
    parts: ModelLike,
    scheduler: Any,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    latents: torch.Tensor,
    settings: SamplerSettings,
) -> torch.Tensor:
    scheduler.set_timesteps(settings.steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    guided = settings.guidance > 1.0
    context = torch.cat([uncond.expand_as(cond), cond]) if guided else cond
    for t in scheduler.timesteps:
        model_in = torch.cat([latents, latents]) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        pred = parts.unet(model_in, t, encoder_hidden_states=context).sample.float()
        if guided:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + settings.guidance * (pred_cond - pred_uncond)
        latents = scheduler.step(pred, t, latents, eta=0.0).prev_sample
    return latents


def _decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    scaled = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        scaled = scaled + shift
    vae_dtype = next(vae.parameters()).dtype
    images = vae.decode(scaled.to(vae_dtype)).sample.float()
    return (images / 2 + 0.5).clamp(0, 1)


def generate(
    parts: ModelLike,
    prompts: Sequence[str],
    latents: torch.Tensor,
    settings: SamplerSettings,
    device: torch.device,
    weight_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Images [N,3,H,W] in [0,1] on the CPU for prompts[i] from latents[i], in batches.

    The caller chooses the mode (see `sampling_mode`, `adapters_disabled`); this only computes.
    """
    if len(prompts) != len(latents):
        raise ValueError(f"{len(prompts)} prompts but {len(latents)} initial latents")
    scheduler = make_scheduler(parts.noise_scheduler)
    out: list[torch.Tensor] = []
    with _autocast(device, weight_dtype):
        uncond = encode_prompts(parts, [""], device)
        for start in range(0, len(prompts), settings.batch_size):
            batch_prompts = list(prompts[start : start + settings.batch_size])
            cond = encode_prompts(parts, batch_prompts, device)
            lat = latents[start : start + settings.batch_size].to(device=device, dtype=torch.float32)
            lat = _denoise_batch(parts, scheduler, cond, uncond, lat, settings)
            out.append(_decode(parts.vae, lat).cpu())
    return torch.cat(out) if out else torch.empty((0, 3, 0, 0))


# ---------------------------------------------------------------------------------------------
# Images


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def make_grid(
    images: Sequence[Image.Image], rows: int, cols: int, cell: int | None = None, pad: int = 2
) -> Image.Image:
    """Row-major grid on a white background; `cell` resizes each image to cell x cell pixels."""
    if len(images) != rows * cols:
        raise ValueError(f"{len(images)} images do not fill a {rows}x{cols} grid")
    if cell is not None:
        images = [_resize(im, cell) for im in images]
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), "white")
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def grid_cells(
    grid: Image.Image, rows: int, cols: int, cell: tuple[int, int], pad: int = 2
) -> list[Image.Image]:
    """The inverse of `make_grid` (row-major cells)."""
    w, h = cell
    return [
        grid.crop(
            (pad + c * (w + pad), pad + r * (h + pad), pad + c * (w + pad) + w, pad + r * (h + pad) + h)
        )
        for r in range(rows)
        for c in range(cols)
    ]


def _resize(im: Image.Image, size: int) -> Image.Image:
    if im.size == (size, size):
        return im
    up = size > max(im.size)
    return im.resize((size, size), Image.Resampling.NEAREST if up else Image.Resampling.LANCZOS)
