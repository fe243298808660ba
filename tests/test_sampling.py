"""Deterministic sampling: the same weights and seeds give the same images; base mode; grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from dallm.config import LoraConfig, ModelConfig
from dallm.image.sampling import (
    SamplerSettings,
    adapters_disabled,
    generate,
    grid_cells,
    initial_latents,
    latent_shape,
    make_grid,
    sampling_mode,
    strip_tokens,
    to_pil,
)

SETTINGS = SamplerSettings(steps=4, guidance=3.0, batch_size=2)
CPU = torch.device("cpu")


def lora_parts(model_dir: Path, nonzero: bool = True) -> Any:
    """The tiny model with LoRA on UNet and text encoder, in training mode (as the engine holds it)."""
    from dallm.engine.lora import add_lora
    from dallm.image.models import load_parts

    parts = load_parts(ModelConfig(base=str(model_dir)))
    add_lora(parts.unet, parts.text_encoder, LoraConfig(rank=4, text_encoder=True))
    if nonzero:  # B = 0 at init: give the LoRA an effect
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in list(parts.unet.named_parameters()) + list(parts.text_encoder.named_parameters()):
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    parts.unet.train()
    parts.text_encoder.train()
    return parts


@pytest.fixture(scope="module")
def parts(tiny_sd: Path) -> Any:
    return lora_parts(tiny_sd)


def _sample(parts: Any, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    lat = initial_latents(seeds, latent_shape(parts))
    with sampling_mode(parts.unet, parts.vae, parts.text_encoder):
        return generate(parts, prompts, lat, SETTINGS, CPU)


def test_same_weights_and_seeds_give_identical_images(parts: Any) -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = _sample(parts, ["a red circle", "a blue square", "a red circle"], [0, 1, 0])
    after = torch.rand(3)
    b = _sample(parts, ["a red circle", "a blue square", "a red circle"], [0, 1, 0])
    assert a.shape == (3, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert torch.allclose(a[0], a[2], atol=1e-5)  # same prompt and seed in another batch
    assert not torch.equal(a[0], a[1])
    assert torch.equal(before, after), "sampling consumed the global RNG"
    assert parts.unet.training and parts.text_encoder.training, "training mode not restored"


def test_batching_does_not_change_images(parts: Any) -> None:
    lat = initial_latents([3, 4, 5], latent_shape(parts))
    prompts = ["a red circle", "a blue square", "a cat"]
    with sampling_mode(parts.unet, parts.vae, parts.text_encoder):
        one = generate(parts, prompts, lat, SamplerSettings(steps=4, guidance=3.0, batch_size=1), CPU)
        three = generate(parts, prompts, lat, SamplerSettings(steps=4, guidance=3.0, batch_size=3), CPU)
    assert torch.allclose(one, three, atol=1e-5)


def test_adapters_disabled_gives_base_and_restores_everything(tiny_sd: Path, parts: Any) -> None:
    from dallm.image.models import load_parts

    # Freeze the UNet LoRA (as during textual-inversion-only steps): the flag must survive.
    unet_lora = [p for n, p in parts.unet.named_parameters() if "lora_" in n]
    for p in unet_lora:
        p.requires_grad_(False)
    te_flags = [p.requires_grad for p in parts.text_encoder.parameters()]
    try:
        adapted = _sample(parts, ["a red circle"], [0])
        with adapters_disabled(parts.unet, parts.text_encoder):
            base = _sample(parts, ["a red circle"], [0])
        again = _sample(parts, ["a red circle"], [0])
        assert not any(p.requires_grad for p in unet_lora)
        assert [p.requires_grad for p in parts.text_encoder.parameters()] == te_flags
    finally:
        for p in unet_lora:
            p.requires_grad_(True)
    plain = _sample(load_parts(ModelConfig(base=str(tiny_sd))), ["a red circle"], [0])
    assert torch.equal(adapted, again)
    assert (adapted - base).abs().max() > 1e-3
    assert torch.allclose(base, plain, atol=1e-5), "adapters off is not the base model"


def test_strip_tokens() -> None:
    assert strip_tokens("a red circle in baroque style like <s1><s2>", ["<s1>", "<s2>"]) == (
        "a red circle in baroque style like"
    )
    assert strip_tokens("<s1> cat  <s2>", ["<s1>", "<s2>"]) == "cat"
    assert strip_tokens("a cat", []) == "a cat"
    assert strip_tokens("a cat in <s1><s2> style", ["<s1>", "<s2>"], "plain") == "a cat in plain style"
    assert strip_tokens("<s2> x <s1> <s2>", ["<s1>", "<s2>"], "w") == "w x w"


def test_grid_round_trip_and_thumbnail() -> None:
    images = to_pil(torch.rand(6, 3, 10, 10))
    grid = make_grid(images, 2, 3)
    assert grid.size == (3 * 10 + 4 * 2, 2 * 10 + 3 * 2)
    for a, b in zip(images, grid_cells(grid, 2, 3, (10, 10)), strict=True):
        assert a.tobytes() == b.tobytes()
    assert make_grid(images, 3, 2, cell=32, pad=1).size == (2 * 32 + 3, 3 * 32 + 4)
    with pytest.raises(ValueError, match="do not fill"):
        make_grid(images, 2, 2)
    assert isinstance(images[0], Image.Image)
