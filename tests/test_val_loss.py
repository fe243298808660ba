"""The repeatable validation loss (dallm.eval.val_loss) on the tiny SD model, epsilon and v-prediction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dallm.config import LoraConfig, ModelConfig
from dallm.engine.lora import add_lora, lora_parameters
from dallm.eval.val_loss import (
    encode_latents,
    fixed_noise,
    fixed_timesteps,
    image_validation_loss,
    validation_loss,
)
from dallm.image.models import load_parts
from dallm.image.sampling import encode_prompts

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow cat", "a dog"]


def pixels(n: int = 5, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1


def parts_of(folder: Path):
    torch.set_num_threads(1)
    parts = load_parts(ModelConfig(base=str(folder)))
    add_lora(parts.unet, parts.text_encoder, LoraConfig(rank=2, init="gaussian"))
    parts.unet.train()  # as during training: the measure must not depend on it
    return parts


def test_fixed_timesteps_are_kohyas_scaled_to_the_schedule():
    assert fixed_timesteps(1000) == [10, 350, 500, 650, 990]
    assert fixed_timesteps(100) == [1, 35, 50, 65, 99]
    assert fixed_timesteps(10) == [0, 4, 5, 6, 9]  # distinct, in range
    noise = fixed_noise((2, 4, 3, 3), 5, seed=7)
    assert noise.shape == (5, 2, 4, 3, 3) and torch.equal(noise, fixed_noise((2, 4, 3, 3), 5, seed=7))


def test_same_weights_same_value_bit_for_bit_and_nothing_else_moves(tiny_sd):
    parts = parts_of(tiny_sd)
    x = pixels()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = image_validation_loss(parts, x, CAPTIONS, batch_size=2)
    after = torch.rand(1)
    b = image_validation_loss(parts, x, CAPTIONS, batch_size=2)
    assert a == b and torch.equal(before, after)  # the global RNG stream is left as it was
    assert parts.unet.training  # the train mode is given back
    assert list(a.per_timestep) == [10, 350, 500, 650, 990]
    assert a.mean == pytest.approx(sum(a.per_timestep.values()) / 5)
    assert a.values()["val_loss"] == a.mean and a.values()["val_loss_t990"] == a.per_timestep[990]
    # the batch split changes the arithmetic order only
    c = image_validation_loss(parts, x, CAPTIONS, batch_size=3)
    assert c.mean == pytest.approx(a.mean, rel=1e-5)
    # other weights, another value; the same weights again, the same value
    saved = [p.detach().clone() for p in lora_parameters(parts.unet)]
    with torch.no_grad():
        for p in lora_parameters(parts.unet):
            p.add_(0.05)
    moved = image_validation_loss(parts, x, CAPTIONS, batch_size=2)
    assert moved.mean != a.mean
    with torch.no_grad():
        for p, s in zip(lora_parameters(parts.unet), saved, strict=True):
            p.copy_(s)
    assert image_validation_loss(parts, x, CAPTIONS, batch_size=2) == a
    assert image_validation_loss(parts, x, CAPTIONS, batch_size=2, seed=2) != a  # other noise


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sd_vpred"])
def test_it_is_the_models_own_objective(fixture, request):
    parts = parts_of(request.getfixturevalue(fixture))
    sched = parts.noise_scheduler
    x = pixels(3)
    lat = encode_latents(parts.vae, x)
    with torch.no_grad():
        hidden = encode_prompts(parts, CAPTIONS[:3], torch.device("cpu"))
    got = validation_loss(parts.unet, sched, lat, hidden, timesteps=[500], seed=11)
    # written out: the noise of fixed_noise, the scheduler's noising, the prediction type's target
    noise = fixed_noise(lat.shape, 1, seed=11)[0]
    t = torch.full((3,), 500)
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(lat, noise, t)
    parts.unet.eval()
    with torch.no_grad():
        pred = parts.unet(sched.add_noise(lat, noise, t), t, hidden, return_dict=False)[0]
    assert got.per_timestep[500] == pytest.approx(float(F.mse_loss(pred, target)), rel=1e-5)
    if sched.config.prediction_type == "v_prediction":  # not the epsilon loss
        assert got.per_timestep[500] != pytest.approx(float(F.mse_loss(pred, noise)), rel=1e-3)


def test_errors_say_what_is_missing(tiny_sd):
    parts = parts_of(tiny_sd)
    with pytest.raises(ValueError, match="5 images and 4 captions"):
        image_validation_loss(parts, pixels(), CAPTIONS[:4])
    with pytest.raises(ValueError, match="2 latents and 3 text states"):
        validation_loss(parts.unet, parts.noise_scheduler, torch.zeros(2, 4, 8, 8), torch.zeros(3, 16, 32))
