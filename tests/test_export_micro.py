"""A text-encoder LoRA job on the shipped micro model, exported and loaded into a plain diffusers
pipeline: the text encoder's LoRA is applied (its outputs move off the base model's and equal the
trained model's), and the kohya export (tokens bundled + sibling file) draws the same images as the
diffusers export for the same seed."""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import write_images
from engine_helpers import job

from dallm.config import JobConfig
from dallm.engine.checkpoint import find_checkpoint, load_checkpoint
from dallm.engine.dispatch import train
from dallm.image.data import load_training_data
from dallm.image.export import export_lora, kohya_usage
from dallm.image.models import load_parts
from dallm.image.trainer import ImageTrainer
from dallm.micro import MODEL_DIR

TOKENS = ["<s1>", "<s2>"]
PROMPT = "a red circle on blue background in <s1><s2> style"
PLAIN = "a red circle on blue background"  # no new token: only the text encoder's LoRA moves it


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[JobConfig, Path]:
    images = write_images(tmp_path_factory.mktemp("img") / "images", 4, size=32)
    cfg = job(
        MODEL_DIR,
        images,
        data={"instance_prompt": PROMPT},
        train={"steps": 4, "lr": 2e-2, "batch_size": 2},
        lora={"text_encoder": True, "init": "gaussian"},
        tokens={"new": TOKENS, "lr": 5e-2},
        checkpoint={"every": 4},
    )
    out = tmp_path_factory.mktemp("run") / "out"
    assert train(cfg, out_dir=out).result_step == 4
    return cfg, out


def _pipe(**parts: Any):  # noqa: ANN202
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, local_files_only=True)
    if parts:
        pipe = StableDiffusionPipeline(**(pipe.components | parts))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _trained(cfg: JobConfig, out: Path):  # noqa: ANN202
    """The engine's own model with the weights of the result step (no export on the way)."""
    parts = load_parts(cfg.model)
    images, _ = load_training_data(cfg.data, 32)
    trainer = ImageTrainer(cfg, parts, images, None, torch.device("cpu"))
    trainer.load(load_checkpoint(find_checkpoint(out, 4)))
    parts.unet.eval()
    parts.text_encoder.eval()
    return _pipe(unet=parts.unet, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer)


def _hidden(pipe, prompt: str) -> torch.Tensor:  # noqa: ANN001
    ids = pipe.tokenizer(prompt, padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def _image(pipe, prompt: str) -> np.ndarray:  # noqa: ANN001
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=3, generator=g, output_type="np").images[0]


def test_text_encoder_lora_loads_in_diffusers(run: tuple[JobConfig, Path]) -> None:
    cfg, out = run
    base, trained, loaded = _pipe(), _trained(cfg, out), _pipe()
    loaded.load_lora_weights(out)
    rows = safetensors.torch.load_file(str(out / "job_emb.safetensors"))["clip_l"]
    loaded.load_textual_inversion(
        rows, token=TOKENS, text_encoder=loaded.text_encoder, tokenizer=loaded.tokenizer
    )
    assert loaded.get_list_adapters().keys() == {"unet", "text_encoder"}
    plain = _hidden(loaded, PLAIN)
    assert (plain - _hidden(base, PLAIN)).abs().max() > 1e-3  # the text encoder's LoRA is applied
    torch.testing.assert_close(plain, _hidden(trained, PLAIN), rtol=0, atol=1e-5)
    torch.testing.assert_close(_hidden(loaded, PROMPT), _hidden(trained, PROMPT), rtol=0, atol=1e-5)
    image = _image(loaded, PROMPT)
    np.testing.assert_allclose(image, _image(trained, PROMPT), rtol=0, atol=1e-4)
    assert np.abs(image - _image(base, PROMPT)).max() > 1e-2


def test_kohya_export_with_tokens_draws_the_same_images(run: tuple[JobConfig, Path], tmp_path: Path) -> None:
    _, out = run
    path = export_lora(out, "kohya", tmp_path / "job.safetensors")
    usage = kohya_usage(path)
    assert usage is not None and "<s1><s2>" in usage
    kohya = _pipe()
    # Run the diffusers lines `dallm export` prints, as printed.
    code = textwrap.dedent(usage.split("in diffusers:\n", 1)[1])
    exec(code, {"pipe": kohya, "safetensors": safetensors})  # noqa: S102
    diffusers = _pipe()
    folder = tmp_path / "diffusers"
    export_lora(out, "diffusers", folder)
    diffusers.load_lora_weights(folder)
    rows = safetensors.torch.load_file(str(folder / "job_emb.safetensors"))["clip_l"]
    diffusers.load_textual_inversion(
        rows, token=TOKENS, text_encoder=diffusers.text_encoder, tokenizer=diffusers.tokenizer
    )
    assert kohya.get_list_adapters().keys() == {"unet", "text_encoder"}
    torch.testing.assert_close(_hidden(kohya, PROMPT), _hidden(diffusers, PROMPT), rtol=0, atol=1e-6)
    np.testing.assert_allclose(_image(kohya, PROMPT), _image(diffusers, PROMPT), rtol=0, atol=1e-5)
