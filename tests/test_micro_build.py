"""`dallm micro build` end to end at a tiny step count, so the build cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.xdist_group("micro_build")
def test_build_end_to_end_tiny(tmp_path: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    from dallm.build_manifest import sha256
    from dallm.micro import load_feature_net
    from dallm.micro.build import EvalSizes, build

    torch.set_num_threads(1)
    out = tmp_path / "micro"
    sizes = EvalSizes(prompt_samples=4, style_images=8, teacher_ref=8, steps=2, subset_size=4, num_subsets=5)
    manifest = build(out, steps_scale=0.002, device="cpu", eval_sizes=sizes, log=lambda m: None)

    on_disk = json.loads((out / "MANIFEST.json").read_text())
    assert on_disk["files"] == manifest["files"]
    for rel, entry in manifest["files"].items():
        assert sha256(out / rel) == entry["sha256"]
    assert {"model/model_index.json", "model/unet/config.json", "featnet.safetensors", "featnet.json"} <= set(
        manifest["files"]
    )
    q = manifest["quality"]
    assert {"prompt_following", "style_accuracy", "kid", "kid_ratio_base_teacher_over_teacher_split"} <= set(
        q
    )
    assert manifest["seconds"]["total"] > 0 and manifest["device"].startswith("cpu")

    pipe = StableDiffusionPipeline.from_pretrained(out / "model", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red circle on blue background", num_inference_steps=2, output_type="pt").images
    assert img.shape == (1, 3, 32, 32)
    net = load_feature_net("cpu", out / "featnet.safetensors")
    assert net(img).shape == (1, 128)
