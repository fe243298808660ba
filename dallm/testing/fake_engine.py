"""A fast, deterministic stand-in for `dallm.engine.dispatch.train` (an `Engine`), for daemon tests and the
daemon benchmark: `dallm-daemon start --runner dallm.testing.fake_engine:train`.

Same contract as the engine: emits StartedEvent, PhaseEvents as the engine does (training, sampling,
kid, checkpointing, stopping; each once when it begins), MetricsEvent per step (with CS and a
CS-Fluctuation that lags 3 windows, as the engine's), SampleEvent
(a PNG thumbnail) every `samples.every`, CheckpointEvent every `checkpoint.every` (written atomically
to checkpoints/step-N/), FinishedEvent; calls `poll()` once per step and obeys Stop / Rollback /
CheckpointNow / Interrupt; prunes to `checkpoint.keep` (never the turning point's) and says which
it deleted; a ProgressEvent (step, loss, lr) about once a second; `resume` takes a checkpoint folder or the output folder (latest
checkpoint) and cuts metrics.jsonl after the resume step, putting back the rows the checkpoint saved
(as the engine does, so a resume after a rollback to an earlier step leaves no hole).

Step time: $DALLM_FAKE_STEP_S (default 0.02 s). Faults come from dot-separated tokens in the job
name, e.g. name "a-nan.5": `nan.N` (NaN loss at step N), `oom.N` (CUDA OOM at step N), `diskfull.N`
(ENOSPC while writing the checkpoint of step N), `exit.N` (the process dies at step N), `tp.N`
(turning point at step N, seen 3 steps later), `stopat.N` (with tp.N: the turning point says the
job stops at step N, and it ends there, early-stopped), `blast.N` (N metric events per step, for benchmarks),
`png.N` (N x N thumbnails).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import time
import zlib
from pathlib import Path

from dallm.config import JobConfig, window_steps
from dallm.engine.metrics_log import MetricsLog
from dallm.protocol import (
    CheckpointEvent,
    CheckpointNowCommand,
    CheckpointsDeletedEvent,
    Emit,
    FinishReason,
    InterruptCommand,
    JobResult,
    LogEvent,
    MetricsEvent,
    PhaseEmit,
    Poll,
    ProgressEvent,
    RollbackCommand,
    RolledBackEvent,
    SampleEvent,
    StartedEvent,
    StopCommand,
    TurningPointEvent,
)
from dallm.protocol.files import METRICS_FILE, RESULT_FILE, ResultFile, checkpoint_folders, write_json


def tiny_png(width: int = 8, height: int = 8, rgb: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    # Small ones are flat; bigger ones are noise, the size a real thumbnail grid compresses to.
    raw = b"".join(
        b"\x00" + (bytes(rgb) * width if width <= 8 else os.urandom(3 * width)) for _ in range(height)
    )
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def faults(name: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(nan|oom|diskfull|exit|tp|stopat|blast|png)\.(\d+)", name)}


def loss_at(step: int) -> float:
    return 1.0 / (1.0 + 0.05 * step) + 0.01 * ((step * 7919) % 13) / 13


def cs_fluct_at(step: int) -> float:
    """The fake's CS-Fluctuation logged at `step`: the real one's scale (1e-6..1e-4), rising with the
    step so that a value on screen tells which step logged it."""
    return 1e-7 * step * (1 + 0.1 * ((step * 7919) % 13) / 13)


def _latest_checkpoint(folder: Path) -> Path | None:
    steps = sorted(
        (int(p.name.split("-")[1]), p)
        for p in (folder / "checkpoints").glob("step-*")
        if p.name[5:].isdigit()
    )
    return steps[-1][1] if steps else None


def train(
    cfg: JobConfig,
    *,
    out_dir: Path | None = None,
    resume: Path | None = None,
    emit: Emit | None = None,
    poll: Poll | None = None,
) -> JobResult:
    out = Path(out_dir) if out_dir is not None else cfg.out
    out.mkdir(parents=True, exist_ok=True)
    send = PhaseEmit(emit or (lambda ev: None))
    get = poll or (lambda: None)
    step_s = float(os.environ.get("DALLM_FAKE_STEP_S", "0.02"))
    fault = faults(cfg.name)
    total = cfg.train.steps
    every = cfg.checkpoint.every
    window = window_steps(cfg)

    def save(step: int) -> None:
        send.enter("checkpointing", step)
        final = out / "checkpoints" / f"step-{step:06d}"
        tmp = out / "checkpoints" / f".tmp-step-{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            if fault.get("diskfull") == step:
                (tmp / "state.json").write_text("{")
                raise OSError(errno.ENOSPC, f"No space left on device: '{tmp / 'state.json'}'")
            (tmp / "state.json").write_text(json.dumps({"step": step, "loss": loss_at(step)}))
            metrics.save_history(tmp, step)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        send(CheckpointEvent(step=step, path=f"checkpoints/step-{step:06d}"))
        keep = cfg.checkpoint.keep
        folders = checkpoint_folders(out / "checkpoints")
        old = [(s, p) for s, p in folders[: max(0, len(folders) - keep)] if s != turning] if keep else []
        for _, path in old:
            shutil.rmtree(path, ignore_errors=True)
        if old:
            send(CheckpointsDeletedEvent(steps=[s for s, _ in old], reason=f"checkpoint.keep = {keep}"))

    start = 0
    metrics = MetricsLog(out / METRICS_FILE)
    if resume is not None:
        resume = Path(resume)
        ckpt = resume if (resume / "state.json").exists() else _latest_checkpoint(resume)
        if ckpt is not None:
            start = json.loads((ckpt / "state.json").read_text())["step"]
        metrics.truncate_after(start, ckpt)
    send(StartedEvent(start_step=start, total_steps=total, device="cpu", trainable_params=1234))
    turning: int | None = None

    def finish(reason: FinishReason, final: int, result: int) -> JobResult:
        send.enter("stopping", final)
        done = JobResult(
            out_dir=out, reason=reason, final_step=final, result_step=result, turning_point=turning
        )
        write_json(
            out / RESULT_FILE,
            ResultFile(reason=reason, final_step=final, result_step=result, turning_point=turning),
        )
        send(done.finished_event())
        return done

    step = start
    progress_at = 0.0
    step_at = time.monotonic()
    try:
        while step < total:
            cmd = get()
            if isinstance(cmd, StopCommand):
                return finish("stopped", step, turning if turning is not None else step)
            if isinstance(cmd, InterruptCommand):
                if step > 0:
                    save(step)
                return finish("interrupted", step, step)
            if isinstance(cmd, CheckpointNowCommand) and step > 0:
                save(step)
            if isinstance(cmd, RollbackCommand):
                if cmd.step > step:
                    send(LogEvent(level="error", message=f"rollback: step {cmd.step} is in the future"))
                else:
                    send(RolledBackEvent(step=cmd.step, resume=cmd.resume))
                    metrics.truncate_after(cmd.step)
                    if not cmd.resume:
                        return finish("rolled_back", step, cmd.step)
                    step = cmd.step
                    continue
            send.enter("training", step)
            step += 1
            if step_s:
                time.sleep(step_s)
            if fault.get("exit") == step:
                os._exit(17)
            if fault.get("oom") == step:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
            if fault.get("nan") == step:
                raise FloatingPointError(f"loss is NaN at step {step}")
            now = time.monotonic()
            values = {"loss": loss_at(step), "lr": cfg.train.lr, "steps_per_s": 1 / max(now - step_at, 1e-6)}
            step_at = now
            if step % window == 0:  # CS once a window; its fluctuation looks 3 windows ahead (Eqs. 3-4)
                values["cs"] = 0.9 + 0.05 * loss_at(step)
                if step >= 4 * window:
                    values |= {"cs_fluct": cs_fluct_at(step), "cs_fluct_step": float(step - 3 * window)}
            if cfg.eval.every and step % cfg.eval.every == 0:  # a KID that depends on the step
                send.enter("kid", step)
                values |= {"kid_val": 1.0 / step, "kid_val_std": 0.1 / step}
            if time.monotonic() - progress_at >= 1.0 or step == total:
                progress_at = time.monotonic()
                send(ProgressEvent(step=step, values={k: values[k] for k in ("loss", "lr", "steps_per_s")}))
            event = MetricsEvent(step=step, values=values)
            for _ in range(fault.get("blast", 1)):
                send(event)
            metrics.write(step, {"loss": loss_at(step)})
            if cfg.samples.every and step % cfg.samples.every == 0:
                send.enter("sampling", step)
                send(
                    SampleEvent(
                        step=step,
                        path=f"samples/step-{step}.png",
                        png=tiny_png(fault.get("png", 8), fault.get("png", 8)),
                        prompts=cfg.samples.prompts,
                    )
                )
            if fault.get("tp") is not None and step == fault["tp"] + 3:
                turning = fault["tp"]
                send(TurningPointEvent(step=turning, seen_at=step, stop_at=fault.get("stopat")))
            if fault.get("stopat") == step and turning is not None:
                return finish("early_stop", step, turning)
            if step % every == 0 or step == total:
                save(step)
        return finish("completed", step, step)
    finally:
        metrics.close()
