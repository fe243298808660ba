"""The training loop on the tiny model: determinism, exact resume, outputs, new tokens, v-prediction."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from engine_helpers import job, losses, metrics, same_weights, weights

from dallm.engine.checkpoint import checkpoint_folders, load_checkpoint
from dallm.engine.dispatch import train
from dallm.image.data import DataError
from dallm.protocol import (
    CheckpointsDeletedEvent,
    FinishedEvent,
    InterruptCommand,
    JobEvent,
    MetricsEvent,
    PhaseEvent,
    ProgressEvent,
    StartedEvent,
)


def test_same_seed_same_losses(tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path) -> None:
    images = image_dir(n=3)
    events: list[JobEvent] = []
    r1 = train(job(tiny_sd, images), out_dir=tmp_path / "a", emit=events.append)
    train(job(tiny_sd, images), out_dir=tmp_path / "b")
    train(job(tiny_sd, images, seed=1), out_dir=tmp_path / "c")
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a") != losses(tmp_path / "c")
    assert (r1.reason, r1.final_step, r1.result_step) == ("completed", 6, 6)
    assert isinstance(events[0], StartedEvent) and isinstance(events[-1], FinishedEvent)
    rows = [e for e in events if isinstance(e, MetricsEvent)]
    assert [e.step for e in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "steps_per_s", "cs"} <= rows[0].values.keys()
    assert "cs_fluct" in rows[-1].values  # known from step 3 (window - 1) * 3 + 1 with window 2
    out = tmp_path / "a"
    for name in ("pytorch_lora_weights.safetensors", "metrics.jsonl", "config.toml", "result.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "result.json").read_text())["reason"] == "completed"
    assert [s for s, _ in checkpoint_folders(out / "checkpoints")] == [3, 6]
    assert same_weights(weights(out), weights(out / "checkpoints" / "step-000006"))


def test_resume_is_exact(tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path) -> None:
    """Interrupt at step 4 (checkpoint), resume: the same losses and weights as one run, bit for bit.
    Covers flips, grad accumulation, dropout, cosine warmup, TE LoRA, new tokens with ti_steps and
    prior preservation: every RNG stream and optimizer state that a resume must restore."""
    images, classes = image_dir(n=3, captions=True), image_dir(n=2, name="classes", seed=3)
    cfg = job(
        tiny_sd,
        images,
        data={"random_flip": True, "class_dir": str(classes), "class_prompt": "a circle"},
        train={"steps": 7, "grad_accum": 2, "batch_size": 2, "lr_scheduler": "cosine", "warmup_steps": 2},
        lora={"text_encoder": True, "dropout": 0.1, "alpha": 8},
        tokens={"new": ["<s1>", "<s2>"], "ti_steps": 2},
    )
    train(cfg, out_dir=tmp_path / "whole")
    polls = iter([None] * 4 + [InterruptCommand()])
    r = train(cfg, out_dir=tmp_path / "split", poll=lambda: next(polls, None))
    assert (r.reason, r.final_step) == ("interrupted", 4)
    assert [s for s, _ in checkpoint_folders(tmp_path / "split" / "checkpoints")] == [3, 4]
    r = train(cfg, resume=tmp_path / "split")
    assert (r.out_dir, r.reason, r.final_step) == (tmp_path / "split", "completed", 7)
    assert [m["step"] for m in metrics(tmp_path / "split")] == list(range(1, 8))  # no duplicates
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert same_weights(weights(tmp_path / "split"), weights(tmp_path / "whole"))
    emb = "job_emb.safetensors"
    assert same_weights(weights_file(tmp_path / "split" / emb), weights_file(tmp_path / "whole" / emb))


def weights_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_new_tokens_only_their_rows_change(
    tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path
) -> None:
    from transformers import CLIPTextModel, CLIPTokenizer

    cfg = job(
        tiny_sd,
        image_dir(n=2),
        data={"instance_prompt": "a <s1> <s2> painting"},
        tokens={"new": ["<s1>", "<s2>"], "init_word": "painting", "ti_steps": 3},
        checkpoint={"every": 3},
    )
    train(cfg, out_dir=tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "step-000003")
    assert all(not v.any() for k, v in state.lora.items() if "lora_B" in k)  # LoRA waited
    assert any(
        v.any()
        for k, v in load_checkpoint(tmp_path / "checkpoints" / "step-000006").lora.items()
        if "lora_B" in k
    )
    tok = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    base = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder").get_input_embeddings().weight
    word = base[tok.encode("painting", add_special_tokens=False)[0]]
    rows = weights_file(tmp_path / "job_emb.safetensors")["clip_l"]
    assert rows.shape == (2, base.shape[1])
    assert 0 < (rows - word).abs().max() < 0.1  # started at "painting", trained a little


def test_token_rows_other_rows_fixed(tiny_sd: Path, image_dir: Callable[..., Path]) -> None:
    from dallm.image.data import load_training_data
    from dallm.image.models import load_parts
    from dallm.image.trainer import ImageTrainer

    cfg = job(
        tiny_sd,
        image_dir(n=2),
        data={"instance_prompt": "a <s1> cat"},
        tokens={"new": ["<s1>"]},
        lora={"text_encoder": True},  # peft freezes the text encoder's other weights: rows must still train
    )
    images, _ = load_training_data(cfg.data, 16)
    trainer = ImageTrainer(cfg, load_parts(cfg.model), images, None, torch.device("cpu"))
    assert trainer.tokens is not None
    before = trainer.tokens.embedding.detach().clone()
    for step in range(2):
        trainer.step(step)
    after = trainer.tokens.embedding.detach()
    changed = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == trainer.tokens.ids


def test_v_prediction(tiny_sd_vpred: Path, image_dir: Callable[..., Path], tmp_path: Path) -> None:
    r = train(
        job(tiny_sd_vpred, image_dir(n=2), train={"steps": 2}, checkpoint={"every": 5}), out_dir=tmp_path
    )
    assert r.reason == "completed" and all(torch.isfinite(torch.tensor(losses(tmp_path))))


def test_checkpoint_keep_bounds_disk(tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path) -> None:
    cfg = job(tiny_sd, image_dir(n=2), checkpoint={"every": 1, "keep": 2}, monitor={"cs": False})
    events: list = []
    train(cfg, out_dir=tmp_path, emit=events.append)
    assert [s for s, _ in checkpoint_folders(tmp_path / "checkpoints")] == [5, 6]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    # every deletion is said (the daemon's and the TUI's checkpoint lists must not offer them)
    deleted = [e for e in events if isinstance(e, CheckpointsDeletedEvent)]
    assert sorted(s for e in deleted for s in e.steps) == [1, 2, 3, 4]
    assert {e.reason for e in deleted} == {"checkpoint.keep = 2"}
    # the trainer's own step (ProgressEvent), also at the last step, with its loss and lr
    progress = [e for e in events if isinstance(e, ProgressEvent)]
    assert progress[-1].step == 6 and {"loss", "lr", "steps_per_s"} <= progress[-1].values.keys()


def test_bad_image_fails_before_model_loads(
    tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = image_dir(n=2)
    (images / "broken.png").write_bytes(b"\x89PNG garbage")

    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded before the images were checked")

    monkeypatch.setattr("dallm.image.train.load_parts", no_load)
    with pytest.raises(DataError, match="broken.png"):
        train(job(tiny_sd, images), out_dir=tmp_path)


def test_gradient_checkpointing_same_losses(
    tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path
) -> None:
    images = image_dir(n=2)
    for gc in (False, True):
        cfg = job(
            tiny_sd, images, train={"steps": 2, "gradient_checkpointing": gc}, lora={"text_encoder": True}
        )
        train(cfg, out_dir=tmp_path / str(gc))
    assert losses(tmp_path / "False") == losses(tmp_path / "True")
    assert same_weights(weights(tmp_path / "False"), weights(tmp_path / "True"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_precision_step(tiny_sd: Path, image_dir: Callable[..., Path], dtype: torch.dtype) -> None:
    """The CUDA mixed-precision path (frozen weights in fp16/bf16, autocast, GradScaler for fp16, a
    float32 text encoder when it trains) emulated on the CPU: every trainable group moves."""
    from dallm.image.data import load_training_data
    from dallm.image.models import load_parts
    from dallm.image.trainer import ImageTrainer

    cfg = job(
        tiny_sd,
        image_dir(n=2),
        data={"instance_prompt": "a <s1> cat"},
        lora={"text_encoder": True},
        tokens={"new": ["<s1>"], "ti_steps": 1},
    )
    images, _ = load_training_data(cfg.data, 16)
    parts = load_parts(cfg.model, weight_dtype=dtype)
    assert next(parts.unet.parameters()).dtype == dtype
    parts.text_encoder.to(torch.float32)  # as train() does when the text encoder trains
    trainer = ImageTrainer(cfg, parts, images, None, torch.device("cpu"))
    trainer.use_autocast, trainer.autocast_dtype = True, dtype
    trainer.scaler = torch.amp.GradScaler("cpu") if dtype == torch.float16 else None
    assert trainer.tokens is not None
    rows, lora = trainer.tokens.rows(), [p.detach().clone() for p in trainer.unet_params + trainer.te_params]
    for step in range(3):
        assert math.isfinite(trainer.step(step)["loss"])
    assert not torch.equal(rows, trainer.tokens.rows())
    moved = [
        not torch.equal(a, p) for a, p in zip(lora, trainer.unet_params + trainer.te_params, strict=True)
    ]
    assert all(p.dtype == torch.float32 for p in trainer.unet_params) and any(moved)


def test_sampling_does_not_change_training(
    tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path
) -> None:
    """Sample grids during training draw no number from the training RNG streams."""
    images = image_dir(n=2)
    samples = {"every": 2, "prompts": ["a red circle"], "seeds": [0], "steps": 2}
    train(job(tiny_sd, images, train={"steps": 4}, samples=samples), out_dir=tmp_path / "with")
    train(job(tiny_sd, images, train={"steps": 4}), out_dir=tmp_path / "without")
    assert losses(tmp_path / "with") == losses(tmp_path / "without")
    assert (tmp_path / "with" / "samples" / "step-000004.png").is_file()


def test_phase_events_frame_each_evaluation_and_checkpoint(
    tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path
) -> None:
    """The engine says when it leaves training (samples, a checkpoint, the end) and when it comes
    back, each change once: a step counter that stands still has a reason on the wire."""
    events: list[JobEvent] = []
    samples = {"every": 2, "prompts": ["a red circle"], "seeds": [0], "steps": 2}
    train(
        job(tiny_sd, image_dir(n=2), train={"steps": 4}, samples=samples),
        out_dir=tmp_path,
        emit=events.append,
    )
    phases = [(e.phase, e.step) for e in events if isinstance(e, PhaseEvent)]
    assert phases == [
        ("training", 0),
        ("sampling", 2),
        ("training", 2),
        ("checkpointing", 3),
        ("training", 3),
        ("sampling", 4),
        ("stopping", 4),  # the grid of step 4 exists: the end makes no second one
    ]
    kinds = [e.kind for e in events if e.kind in ("phase", "sample", "started", "finished")]
    assert kinds[:4] == ["started", "phase", "phase", "sample"]  # "sampling" comes before its grid
    assert kinds[-3:] == ["sample", "phase", "finished"]
    started = next(e for e in events if isinstance(e, StartedEvent))
    assert (started.samples_every, started.eval_every) == (2, 0)
    sampled = [e for e in events if isinstance(e, MetricsEvent) and "eval_stop_seconds" in e.values]
    assert [e.step for e in sampled] == [2, 4] and all(e.values["eval_stop_seconds"] > 0 for e in sampled)
    times = [e.at for e in events if isinstance(e, PhaseEvent)]
    assert times == sorted(times)
