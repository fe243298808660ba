"""Prompt fidelity (dallm.eval.fidelity): held-out prompts, the micro heads, a CLIP score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dallm.eval.fidelity import (
    ClipScorer,
    clip_cosines,
    held_out_prompts,
    held_out_scenes,
    micro_fidelity,
)
from dallm.micro import load_feature_net
from dallm.micro.build import to_tensor
from dallm.micro.teacher import render_teacher
from dallm.micro.world import COLOUR_NAMES, SHAPES, Scene, parse_prompt, render

TRAIN = [
    "a red circle on blue background in <s1><s2> style",
    "a yellow square on black background in <s1><s2> style",
    "a white triangle on green background in <s1><s2> style",
]


def content(caption: str) -> tuple:
    p = parse_prompt(caption)
    return p["shape"], p["fg"], p["bg"]


def test_held_out_prompts_are_outside_the_training_captions_and_fixed():
    scenes, prompts = held_out_prompts(200, TRAIN)
    assert {content(p) for p in prompts}.isdisjoint({content(c) for c in TRAIN})
    assert all(p.endswith(" in <s1><s2> style") for p in prompts)
    assert len({content(p) for p in prompts}) > 40  # many of the 87 remaining scenes
    again, _ = held_out_prompts(200, TRAIN)
    assert again == scenes
    assert held_out_scenes(10, TRAIN, seed=1) != held_out_scenes(10, TRAIN, seed=2)


def test_no_held_out_scene_is_left_when_training_covers_the_world():
    every = [
        f"a {f} {s} on {b} background" for s in SHAPES for f in COLOUR_NAMES for b in COLOUR_NAMES if f != b
    ]
    assert held_out_scenes(3, every[1:])[0].caption() == every[0]  # the one left out
    with pytest.raises(ValueError, match="cover every scene"):
        held_out_scenes(3, every)


@pytest.fixture(scope="module")
def net():
    torch.set_num_threads(1)
    return load_feature_net()


def test_micro_fidelity_reads_what_was_drawn(net):
    scenes = held_out_scenes(48, TRAIN)
    rng = np.random.default_rng(0)
    teacher = to_tensor(np.stack([render_teacher(s, rng) for s in scenes]))
    plain = to_tensor(np.stack([render(s) for s in scenes]))
    t = micro_fidelity(net, teacher, scenes)
    assert t["shape"] >= 0.9 and t["fg"] >= 0.8 and t["style"] >= 0.9, t
    assert t["fidelity"] == pytest.approx((t["shape"] + t["fg"] + t["bg"]) / 3)
    p = micro_fidelity(net, plain, scenes)
    assert p["style"] <= 0.1 and p["fidelity"] >= 0.9, p
    assert micro_fidelity(net, plain, scenes, style="plain")["style"] >= 0.9
    # the same images read against other prompts: the content no longer matches
    others = [Scene(s.shape, s.bg, s.fg) for s in scenes]  # colours swapped
    wrong = micro_fidelity(net, plain, others)
    assert wrong["fg"] <= 0.1 and wrong["bg"] <= 0.1 and wrong["shape"] == p["shape"]
    with pytest.raises(ValueError, match="48 images for 47 scenes"):
        micro_fidelity(net, plain, scenes[:-1])


def test_clip_cosines_are_cosines():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    y = torch.tensor([[2.0, 0.0], [0.0, -1.0], [4.0, -3.0]])
    assert clip_cosines(x, y).tolist() == pytest.approx([1.0, -1.0, 0.0])
    with pytest.raises(ValueError, match="embeddings"):
        clip_cosines(x, y[:2])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLIPModel from a config (random weights) with a whole-word tokenizer, saved as a folder."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from dallm.image.tiny import write_clip_tokenizer

    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    write_clip_tokenizer(folder, ["a", "red", "circle", "on", "blue", "background", "square"])
    tok = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    # projection_dim in each tower's config too, as released CLIP folders have it: each tower loads alone
    cfg = CLIPConfig(
        text_config={
            **tower,
            "projection_dim": 16,
            "max_position_embeddings": tok.model_max_length,
            "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={**tower, "projection_dim": 16, "image_size": 30, "patch_size": 6},
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(folder)
    return folder


def test_clip_score_runs_is_deterministic_and_in_range(tiny_clip):
    scorer = ClipScorer(tiny_clip)
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle on blue background", "a square", "a", "red red red", "a blue square"]
    out = scorer(images, prompts)
    cos = out["cosines"]
    assert cos.shape == (5,) and cos.dtype == torch.float64
    assert ((cos >= -1) & (cos <= 1)).all() and cos.std() > 0
    assert out["fidelity"] == pytest.approx(float(cos.mean()))
    assert torch.equal(ClipScorer(tiny_clip)(images, prompts)["cosines"], cos)
    assert scorer(images[:2], prompts[:2])["cosines"].tolist() == pytest.approx(cos[:2].tolist(), abs=1e-6)
    with pytest.raises(ValueError, match="5 images for 4 prompts"):
        scorer(images, prompts[:4])


def test_clip_score_errors_name_the_folder(tmp_path):
    from dallm.eval.features import FeatureError

    with pytest.raises(FeatureError, match="no such folder"):
        ClipScorer(tmp_path / "nope")
