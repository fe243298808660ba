"""The shipped micro model and feature net: offline loading, prompt following, style, KID, manifest.

Fewer samples and sampling steps than the build's own figures (MANIFEST.json), with thresholds that
an untrained model fails (checked here too).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from dallm.build_manifest import sha256
from dallm.micro import FEATNET_PATH, MANIFEST_PATH, MODEL_DIR, feature_dim, load_feature_net
from dallm.micro.build import (
    eval_prompts,
    features,
    make_teacher,
    make_world,
    prompt_following,
    sample,
    to_tensor,
)

N = 24  # samples for prompt following
STEPS = 10


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    torch.manual_seed(0)
    p = StableDiffusionPipeline.from_pretrained(MODEL_DIR, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def net():
    return load_feature_net("cpu")


def test_manifest_matches_the_files() -> None:
    manifest = json.loads(MANIFEST_PATH.read_text())
    root = MANIFEST_PATH.parent
    assert manifest["files"], "empty manifest"
    for rel, entry in manifest["files"].items():
        assert sha256(root / rel) == entry["sha256"], rel
    assert manifest["total_bytes"] <= 20 * 1024 * 1024
    q = manifest["quality"]
    pf = q["prompt_following"]
    assert min(pf["shape"], pf["fg"], pf["bg"]) >= 0.8 and q["samples"] >= 64 and q["steps"] == 25
    assert q["style_accuracy"] >= 0.95
    assert q["kid_ratio_base_teacher_over_teacher_split"] >= 10
    assert {"build_command", "steps", "seconds", "device"} <= set(manifest)


def test_loads_offline_in_sd_format(pipe) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.safety_checker is None
    names = {n for n, _ in pipe.unet.named_modules()}
    for leaf in ("to_q", "to_k", "to_v", "to_out.0"):
        assert any(n.endswith("attn2." + leaf) for n in names), leaf
    # World words are single tokens.
    ids = pipe.tokenizer("a red circle on blue background in baroque style").input_ids
    assert len(ids) == 11


def test_feature_net_contract(net) -> None:
    assert not net.training and net.feature_dim == feature_dim == 128
    assert FEATNET_PATH.with_suffix(".json").exists()
    for size in (32, 64, 17):
        f = net(torch.rand(3, 3, size, size))
        assert f.shape == (3, 128) and torch.isfinite(f).all()


def test_style_is_recognised_on_held_out_images(net) -> None:
    w, _ = make_world(100, 9001)
    t, _ = make_teacher(100, 9002)
    pw = net.predict(to_tensor(w))["style"]
    pt = net.predict(to_tensor(t))["style"]
    acc = torch.cat([pw == 0, pt == 1]).float().mean().item()
    assert acc >= 0.95


def test_base_samples_follow_prompts_and_an_untrained_model_does_not(pipe, net) -> None:
    from diffusers import UNet2DConditionModel

    scenes = eval_prompts(N, 4242)
    prompts = [s.caption() for s in scenes]
    images = sample(pipe, prompts, STEPS, 5.0, 7)
    acc = prompt_following(net, images, scenes)
    assert acc["shape"] >= 0.6 and acc["fg"] >= 0.7 and acc["bg"] >= 0.7, acc

    torch.manual_seed(0)
    trained = pipe.unet
    try:
        pipe.unet = UNet2DConditionModel.from_config(trained.config).eval()
        random_acc = prompt_following(net, sample(pipe, prompts, STEPS, 5.0, 7), scenes)
    finally:
        pipe.unet = trained
    assert not (random_acc["shape"] >= 0.6 and random_acc["fg"] >= 0.7 and random_acc["bg"] >= 0.7), (
        random_acc
    )


def test_kid_base_to_teacher_is_many_times_teacher_to_teacher(pipe, net) -> None:
    from dallm.eval.kid import kid

    scenes = eval_prompts(N, 77)
    base = sample(pipe, [s.caption("baroque") for s in scenes], STEPS, 5.0, 8)
    # the teacher is cheap to render: 200 images per split average the split's KID over subsets
    ta, _ = make_teacher(200, 501)
    tb, _ = make_teacher(200, 502)
    fa, fb, fbase = features(net, to_tensor(ta)), features(net, to_tensor(tb)), features(net, base)
    k_base, _ = kid(fbase, fa, subset_size=N, num_subsets=50, seed=0)
    k_split, std_split = kid(fa, fb, subset_size=N, num_subsets=50, seed=0)
    assert k_base > 10 * max(abs(k_split), std_split / 4, 1e-4), (k_base, k_split, std_split)
    # The base model cannot draw the teacher's style, even when asked.
    assert net.predict(base)["style"].float().mean() < 0.2
