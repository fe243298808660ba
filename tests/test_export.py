"""The result loads into a fresh diffusers pipeline (LoRA + token embedding) and changes its output;
kohya export round-trips through diffusers' kohya loader."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import job
from safetensors.torch import load_file

from dallm.cli import main
from dallm.engine.checkpoint import load_checkpoint
from dallm.engine.dispatch import train
from dallm.image.export import export_lora

TOKENS = ["<s1>", "<s2>"]


@pytest.fixture(scope="module")
def trained(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import write_images

    images = write_images(tmp_path_factory.mktemp("img") / "images", 3)
    cfg = job(
        tiny_sd,
        images,
        data={"instance_prompt": "a <s1> <s2> painting"},
        train={"steps": 4, "lr": 2e-2},
        lora={"text_encoder": True, "alpha": 2, "init": "gaussian"},
        tokens={"new": TOKENS, "lr": 5e-2},
        checkpoint={"every": 2},
    )
    out = tmp_path_factory.mktemp("run") / "out"
    train(cfg, out_dir=out)
    return out


def _pipe(model: Path):  # noqa: ANN202
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, prompt: str) -> np.ndarray:  # noqa: ANN001
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, height=16, width=16, generator=g, output_type="np").images[0]


def _deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """B @ A * scale per LoRA module (whatever adapter name the loader chose)."""
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and len(m.lora_A):
            a = next(iter(m.lora_A))
            out[name] = (m.lora_B[a].weight @ m.lora_A[a].weight) * m.scaling[a]
    return out


def test_result_loads_and_changes_output(tiny_sd: Path, trained: Path) -> None:
    pipe = _pipe(tiny_sd)
    base = _image(pipe, "a red circle")
    pipe.load_lora_weights(trained)
    assert len(_deltas(pipe.unet)) == 32 and len(_deltas(pipe.text_encoder)) > 0
    raw = load_checkpoint(trained / "checkpoints" / "step-000004").lora  # peft tensors, scale alpha/r = 0.5
    for name, delta in _deltas(pipe.unet).items():
        expected = raw[f"{name}.lora_B.weight"] @ raw[f"{name}.lora_A.weight"] * 0.5
        torch.testing.assert_close(delta, expected, rtol=0, atol=1e-6)
    with_lora = _image(pipe, "a red circle")
    assert np.abs(with_lora - base).max() > 1e-4
    rows = load_file(str(trained / "job_emb.safetensors"))["clip_l"]
    pipe.load_textual_inversion(rows, token=TOKENS, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    ids = pipe.tokenizer.convert_tokens_to_ids(TOKENS)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), rows)
    assert np.abs(_image(pipe, "a <s1> <s2> painting") - _image(pipe, "a painting")).max() > 1e-4


def test_kohya_round_trip(tiny_sd: Path, trained: Path, tmp_path: Path) -> None:
    path = export_lora(trained, "kohya", tmp_path / "k.safetensors")
    sd = load_file(str(path))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= sd.keys()
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in sd)
    rows = load_file(str(trained / "job_emb.safetensors"))["clip_l"]
    assert torch.equal(sd.pop("bundle_emb.<s1><s2>.string_to_param.*"), rows)  # A1111's bundle
    assert torch.equal(load_file(str(tmp_path / "k_emb.safetensors"))["clip_l"], rows)
    ref, kohya = _pipe(tiny_sd), _pipe(tiny_sd)
    ref.load_lora_weights(trained)
    kohya.load_lora_weights(sd)  # what `dallm export` prints: the file without its bundle keys
    for model in ("unet", "text_encoder"):
        a, b = _deltas(getattr(ref, model)), _deltas(getattr(kohya, model))
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_cli_export(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(trained), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "d" / "job_emb.safetensors").is_file()
    capsys.readouterr()
    assert main(["export", str(trained), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 0
    out = capsys.readouterr()
    assert out.out == f"{tmp_path / 'k.safetensors'}\n"  # the path alone: scripts read it
    assert "write <s1><s2> in the prompt" in out.err and "k_emb.safetensors" in out.err
    assert (
        main(
            [
                "export",
                str(trained),
                "--step",
                "2",
                "--format",
                "kohya",
                "--out",
                str(tmp_path / "k2.safetensors"),
            ]
        )
        == 0
    )
    step2 = load_file(str(tmp_path / "k2.safetensors"))
    final = load_file(str(export_lora(trained, "kohya", tmp_path / "k4.safetensors")))
    assert step2.keys() == final.keys() and not all(torch.equal(step2[k], final[k]) for k in step2)
    assert (
        main(["export", str(trained), "--step", "3", "--format", "kohya", "--out", str(tmp_path / "x")]) == 1
    )
    assert "no checkpoint at step 3 (have 2, 4)" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), "--format", "kohya", "--out", str(tmp_path / "x")]) == 1


def test_kohya_without_tokens_and_with_two_token_files(tmp_path: Path) -> None:
    from dallm.image.export import kohya_usage, save_embeddings, save_lora

    src = tmp_path / "src"
    save_lora(
        src,
        {"unet.mid.to_q.lora_A.weight": torch.ones(2, 4), "unet.mid.to_q.lora_B.weight": torch.ones(4, 2)},
    )
    path = export_lora(src, "kohya", tmp_path / "k.safetensors")
    assert not any(k.startswith("bundle_emb.") for k in load_file(str(path)))
    assert not (tmp_path / "k_emb.safetensors").exists() and kohya_usage(path) is None
    save_embeddings(src / "a_emb.safetensors", torch.ones(2, 4), TOKENS)
    save_embeddings(src / "b_emb.safetensors", torch.ones(2, 4), TOKENS)
    with pytest.raises(ValueError, match="more than one token file"):
        export_lora(src, "kohya", tmp_path / "k2.safetensors")
    assert not (tmp_path / "k2.safetensors").exists()
