"""Early stopping at the turning point and the commands a running job obeys (scripted `poll`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from engine_helpers import job, losses, metrics, same_weights, weights

from dallm.engine.dispatch import train
from dallm.protocol import (
    CheckpointEvent,
    CheckpointNowCommand,
    JobCommand,
    JobEvent,
    LogEvent,
    RollbackCommand,
    RolledBackEvent,
    StopCommand,
    TurningPointEvent,
)

# On the tiny model with these settings the detector confirms a turning point within ~30 steps.
WATCH = {"window": 4, "min_rise": 0.05}


def scripted(commands: dict[int, list[JobCommand]]) -> Callable[[], JobCommand | None]:
    """poll() giving commands[n] one by one in the n-th pause between steps (pause n comes after
    n steps of an uninterrupted run); a None ends a pause."""
    queues = {k: list(v) for k, v in commands.items()}
    pause = [0]

    def poll() -> JobCommand | None:
        queue = queues.get(pause[0], [])
        if queue:
            return queue.pop(0)
        pause[0] += 1
        return None

    return poll


@pytest.fixture
def images(image_dir: Callable[..., Path]) -> Path:
    return image_dir(n=4, captions=True)


def test_auto_early_stop_returns_exact_turning_point_weights(
    tiny_sd: Path, images: Path, tmp_path: Path
) -> None:
    events: list[JobEvent] = []
    cfg = job(
        tiny_sd,
        images,
        train={"steps": 80},
        monitor={**WATCH, "early_stop": "auto"},
        checkpoint={"every": 100},
    )
    r = train(cfg, out_dir=tmp_path / "auto", emit=events.append)
    assert r.reason == "early_stop" and r.turning_point is not None
    tp = r.turning_point
    assert r.result_step == tp and tp % 4 == 0 and r.final_step > tp
    (found,) = [e for e in events if isinstance(e, TurningPointEvent)]
    assert (found.step, found.seen_at, found.stop_at) == (tp, r.final_step, r.final_step)  # ETA: to it
    # The same run stopped by its step budget at tp has exactly the returned weights.
    plain = job(tiny_sd, images, train={"steps": tp}, monitor=WATCH, checkpoint={"every": 100})
    train(plain, out_dir=tmp_path / "plain")
    assert same_weights(weights(tmp_path / "auto"), weights(tmp_path / "plain"))


def test_result_kid_is_measured_on_the_complete_result_state(
    tiny_sd: Path,
    images: Path,
    image_dir: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The KID reported for the result is that of the weights written: at the turning point the
    UNet LoRA *and* the token embeddings of that step (not the last step's embeddings)."""
    from safetensors.torch import load_file

    from dallm.engine.lora import lora_state
    from dallm.eval.live import LiveEvaluator

    seen: dict[str, object] = {}
    original = LiveEvaluator.evaluate

    def spy(self: LiveEvaluator, step: int) -> dict[str, float]:  # the last call measures the result
        seen["step"], seen["unet"] = step, lora_state(self.parts.unet)
        emb = self.parts.text_encoder.get_input_embeddings().weight
        seen["rows"] = emb[self.parts.tokenizer.convert_tokens_to_ids(["<s1>"])].detach().clone()
        return original(self, step)

    monkeypatch.setattr(LiveEvaluator, "evaluate", spy)
    monkeypatch.setattr("dallm.eval.live.configured_extractor", lambda cfg, device: _Colours())
    cfg = job(
        tiny_sd,
        images,
        train={"steps": 80},
        tokens={"new": ["<s1>"], "lr": 5e-2},
        data={"instance_prompt": "a <s1> circle"},
        monitor={**WATCH, "early_stop": "auto", "select": "turning", "start_step": 0},
        eval={"every": 1000, "num_images": 4, "steps": 2, "val_dir": str(image_dir(n=4, name="val"))},
        checkpoint={"every": 100},
    )
    r = train(cfg, out_dir=tmp_path / "auto")
    assert r.reason == "early_stop" and r.result_step == r.turning_point < r.final_step
    assert seen["step"] == r.result_step
    written = weights(tmp_path / "auto")
    unet = seen["unet"]
    assert isinstance(unet, dict) and len(unet) > 0
    (emb_file,) = (tmp_path / "auto").glob("*_emb.safetensors")
    (rows,) = load_file(str(emb_file)).values()
    assert torch.equal(rows.reshape(-1), seen["rows"].reshape(-1))  # the turning point's embeddings
    plain = job(
        tiny_sd,
        images,
        train={"steps": r.result_step},
        tokens={"new": ["<s1>"], "lr": 5e-2},
        data={"instance_prompt": "a <s1> circle"},
        monitor={**WATCH, "start_step": 0},
        checkpoint={"every": 100},
    )
    train(plain, out_dir=tmp_path / "plain")
    assert same_weights(written, weights(tmp_path / "plain"))


class _Colours:
    def __call__(self, images: object) -> torch.Tensor:
        x = images if isinstance(images, torch.Tensor) else torch.stack([_pil(im) for im in images])  # type: ignore[union-attr]
        return torch.nn.functional.interpolate(x.float(), size=(2, 2), mode="area").flatten(1)


def _pil(im: object) -> torch.Tensor:
    import numpy as np

    arr = np.asarray(im.convert("RGB").resize((8, 8)), dtype=np.float32) / 255  # type: ignore[attr-defined]
    return torch.from_numpy(arr).permute(2, 0, 1)


def test_notify_then_stop_uses_turning_point(tiny_sd: Path, images: Path, tmp_path: Path) -> None:
    events: list[JobEvent] = []
    seen = [e for e in events if isinstance(e, TurningPointEvent)]

    def poll() -> JobCommand | None:
        seen[:] = [e for e in events if isinstance(e, TurningPointEvent)]
        return StopCommand() if seen and metrics_steps() >= seen[0].seen_at + 3 else None

    def metrics_steps() -> int:
        return max((e.step for e in events if e.kind == "metrics"), default=0)

    cfg = job(
        tiny_sd,
        images,
        train={"steps": 80},
        monitor={**WATCH, "early_stop": "notify"},
        checkpoint={"every": 100},
    )
    r = train(cfg, out_dir=tmp_path / "notify", emit=events.append, poll=poll)
    assert r.reason == "stopped" and seen and r.result_step == seen[0].step == r.turning_point
    assert r.final_step == seen[0].seen_at + 3
    assert any(isinstance(e, LogEvent) and "turning point" in e.message for e in events)
    plain = job(tiny_sd, images, train={"steps": r.result_step}, monitor=WATCH, checkpoint={"every": 100})
    train(plain, out_dir=tmp_path / "plain")
    assert same_weights(weights(tmp_path / "notify"), weights(tmp_path / "plain"))


def test_stop_without_turning_point_and_checkpoint_now(tiny_sd: Path, images: Path, tmp_path: Path) -> None:
    events: list[JobEvent] = []
    poll = scripted({5: [CheckpointNowCommand(), StopCommand()]})
    r = train(
        job(tiny_sd, images, checkpoint={"every": 100}), out_dir=tmp_path, emit=events.append, poll=poll
    )
    assert (r.reason, r.final_step, r.result_step, r.turning_point) == ("stopped", 5, 5, None)
    assert [e.step for e in events if isinstance(e, CheckpointEvent)] == [5]
    assert same_weights(weights(tmp_path), weights(tmp_path / "checkpoints" / "step-000005"))


def test_rollback_and_finish(tiny_sd: Path, images: Path, tmp_path: Path) -> None:
    events: list[JobEvent] = []
    r = train(
        job(tiny_sd, images),
        out_dir=tmp_path,
        emit=events.append,
        poll=scripted({5: [RollbackCommand(step=3)]}),
    )
    assert (r.reason, r.final_step, r.result_step) == ("rolled_back", 5, 3)
    assert [e for e in events if isinstance(e, RolledBackEvent)] == [RolledBackEvent(step=3, resume=False)]
    assert same_weights(weights(tmp_path), weights(tmp_path / "checkpoints" / "step-000003"))
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3]


def test_rollback_and_resume_from_snapshot(tiny_sd: Path, images: Path, tmp_path: Path) -> None:
    """Step 2 is no checkpoint (every 3) but a window boundary: its in-memory snapshot is used, with
    the optimizer and RNG state, so training on from it repeats the original steps 3..6 exactly."""
    train(job(tiny_sd, images, monitor={"early_stop": "notify"}), out_dir=tmp_path / "whole")
    events: list[JobEvent] = []
    poll = scripted({5: [RollbackCommand(step=2, resume=True)], 7: [RollbackCommand(step=1)]})
    cfg = job(tiny_sd, images, monitor={"early_stop": "notify"})
    r = train(cfg, out_dir=tmp_path / "rb", emit=events.append, poll=poll)
    assert (r.reason, r.final_step) == ("completed", 6)
    assert [m["step"] for m in metrics(tmp_path / "rb")] == [1, 2, 3, 4, 5, 6]
    assert losses(tmp_path / "rb") == losses(tmp_path / "whole")
    assert same_weights(weights(tmp_path / "rb"), weights(tmp_path / "whole"))
    assert [e.step for e in events if isinstance(e, RolledBackEvent)] == [2]
    # Step 1 was never kept: the command is refused with a log line and training goes on.
    assert any(isinstance(e, LogEvent) and e.level == "error" and "step 1" in e.message for e in events)


def _ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def test_resume_after_rollback_finish_restores_history(tiny_sd: Path, images: Path, tmp_path: Path) -> None:
    """Rollback-finish to 2, then resume from checkpoint 4 (superseded by that rollback): the log gets
    steps 3-4 back from the checkpoint (no hole), and the run ends as the uninterrupted one."""
    cfg = job(tiny_sd, images, checkpoint={"every": 2})
    train(cfg, out_dir=tmp_path / "whole")
    out = tmp_path / "rb"
    train(cfg, out_dir=out)
    # What the daemon does for `dallm rollback JOB --step 2` on a finished job.
    r = train(cfg, resume=_ckpt(out, 2), poll=scripted({0: [RollbackCommand(step=2)]}))
    assert (r.reason, r.result_step) == ("rolled_back", 2)
    assert [m["step"] for m in metrics(out)] == [1, 2]
    events: list[JobEvent] = []
    r = train(cfg, resume=_ckpt(out, 4), emit=events.append)
    assert (r.reason, r.final_step) == ("completed", 6)
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert losses(out) == losses(tmp_path / "whole")
    assert any(isinstance(e, LogEvent) and "metrics of 2 step(s) restored" in e.message for e in events)


def test_rollback_resume_then_finish_then_resume(tiny_sd: Path, images: Path, tmp_path: Path) -> None:
    """Rollback-resume to 2 (checkpoints 4, 6 of the old lineage go), finish at 2 on the new one,
    then resume from its checkpoint 4: the history is the new lineage's, whole, in order."""
    cfg = job(tiny_sd, images, checkpoint={"every": 2})
    train(cfg, out_dir=tmp_path / "whole")
    out = tmp_path / "rb"
    poll = scripted({5: [RollbackCommand(step=2, resume=True)], 8: [RollbackCommand(step=2)]})
    r = train(cfg, out_dir=out, poll=poll)
    assert (r.reason, r.final_step, r.result_step) == ("rolled_back", 5, 2)
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    r = train(cfg, resume=_ckpt(out, 4))
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert losses(out) == losses(tmp_path / "whole")
    assert same_weights(weights(out), weights(tmp_path / "whole"))
