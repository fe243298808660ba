"""Engine speed options of `[train]` on the tiny model (CPU): each changes what it should, and the
losses and weights stay close to the plain path. Their GPU speed is measured by bench/bench_engine.py."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import job, losses, metrics, weights

import dallm.image.trainer
from dallm.config import ConfigError
from dallm.engine.dispatch import train
from dallm.monitor.cs import CosineSimilarity, cs_naive


def close_runs(a: Path, b: Path, rtol: float = 1e-4) -> None:
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) and all(
        math.isclose(x, y, rel_tol=rtol, abs_tol=1e-7) for x, y in zip(la, lb, strict=True)
    )
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=rtol, atol=1e-6)


def trainer_for(cfg: Any) -> dallm.image.trainer.ImageTrainer:
    from dallm.image.data import load_training_data
    from dallm.image.models import load_parts

    images, _ = load_training_data(cfg.data, 16)
    return dallm.image.trainer.ImageTrainer(cfg, load_parts(cfg.model), images, None, torch.device("cpu"))


def test_channels_last_weights_and_inputs_and_same_losses(
    tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path
) -> None:
    images = image_dir(n=2)
    trainer = trainer_for(job(tiny_sd, images, train={"channels_last": True}))
    convs = [p for p in trainer.parts.unet.parameters() if p.dim() == 4 and p.shape[2:] != (1, 1)]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not any(p.is_contiguous() for p in convs)  # really NHWC, not also NCHW-contiguous
    seen: list[bool] = []
    trainer.parts.unet.conv_in.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    trainer.step(0)
    assert seen == [True]
    for cl in (False, True):
        train(job(tiny_sd, images, train={"steps": 3, "channels_last": cl}), out_dir=tmp_path / str(cl))
    close_runs(tmp_path / "False", tmp_path / "True")


def test_compile_runs_the_compiled_unet_and_same_losses(
    tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recording backend (runs the captured graph eagerly) proves the training forward goes
    through torch.compile; inductor itself is tried in the slow test below."""
    graphs: list[torch.fx.GraphModule] = []

    def recording(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(dallm.image.trainer, "COMPILE_BACKEND", recording)
    images = image_dir(n=2)
    for c in (False, True):
        train(job(tiny_sd, images, train={"steps": 3, "compile": c}), out_dir=tmp_path / str(c))
        assert bool(graphs) == c
    close_runs(tmp_path / "False", tmp_path / "True", rtol=1e-5)


def test_compile_that_cannot_run_is_a_one_line_config_error(
    tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        raise RuntimeError("no C++ compiler found\nmore detail")

    torch._dynamo.reset()
    monkeypatch.setattr(dallm.image.trainer, "COMPILE_BACKEND", broken)
    with pytest.raises(ConfigError) as e:
        train(job(tiny_sd, image_dir(n=2), train={"steps": 2, "compile": True}), out_dir=tmp_path)
    msg = str(e.value)
    assert msg.startswith("train.compile: torch.compile cannot run here (") and "\n" not in msg
    assert "no C++ compiler" in msg and msg.endswith("set train.compile = false")


@pytest.mark.slow
def test_compile_with_aot_autograd_on_cpu(
    tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dynamo and AOTAutograd (the joint forward + backward graph, functionalised; inductor's input)
    on the tiny model: losses close. Inductor's own C++ code generation on this 2-core box took over
    15 minutes (docs/engine.md), too long for the suite."""
    torch._dynamo.reset()
    monkeypatch.setattr(dallm.image.trainer, "COMPILE_BACKEND", "aot_eager")
    images = image_dir(n=2)
    for c in (False, True):
        train(job(tiny_sd, images, train={"steps": 2, "compile": c}), out_dir=tmp_path / str(c))
    close_runs(tmp_path / "False", tmp_path / "True", rtol=1e-4)


def test_attention_is_sdpa_after_lora(tiny_sd: Path, image_dir: Callable[..., Path]) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    trainer = trainer_for(job(tiny_sd, image_dir(n=2), lora={"text_encoder": True}))
    procs = trainer.parts.unet.attn_processors
    assert procs and all(type(p) is AttnProcessor2_0 for p in procs.values())
    assert trainer.parts.text_encoder.config._attn_implementation == "sdpa"


def test_batch_and_grad_accum_with_cs_every_step(
    tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path
) -> None:
    """Batch 2 x 2 micro-batches: CS is logged every step and equals the reference on the result."""
    cfg = job(tiny_sd, image_dir(n=3), train={"steps": 4, "batch_size": 2, "grad_accum": 2})
    trainer = trainer_for(cfg)
    cs = CosineSimilarity(trainer.parts.unet)
    for step in range(3):
        trainer.step(step)
        assert abs(cs() - cs_naive(trainer.parts.unet)) < 1e-6  # float32 vs float64, as test_cs.py
    train(cfg, out_dir=tmp_path)
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    assert len(rows) == 4 and all(math.isfinite(r["cs"]) for r in rows)
    assert len({r["cs"] for r in rows}) == 4  # it moves every step
