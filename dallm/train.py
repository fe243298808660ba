"""The training job: `train(cfg)` runs one LoRA job, in the foreground or inside a worker process.

Reading order: `train` sets up (data first, so a bad image fails before the model loads), then
`Job.run` loops: obey `poll()`, train one step, watch CS / CS-Fluctuation, log, evaluate,
checkpoint, and stop at the last step, at the turning point (`monitor.early_stop = "auto"`) or on
a command. `Job.finish` writes the result: the weights of `result_step` (the turning point's exact
weights, from an in-memory snapshot, when the job stopped early).

Steps count from 1; "step N" means the weights after N optimizer steps (step 0: before training).
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from dallm.checkpoint import (
    TrainState,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from dallm.config import ConfigError, JobConfig, monitor_start, save_config
from dallm.data import load_training_data
from dallm.metrics_log import MetricsLog
from dallm.models import load_parts, read_resolution, resolve_base
from dallm.protocol import (
    CheckpointEvent,
    CheckpointNowCommand,
    Emit,
    InterruptCommand,
    JobCommand,
    JobEvent,
    JobResult,
    LogEvent,
    MetricsEvent,
    Poll,
    RollbackCommand,
    RolledBackEvent,
    StartedEvent,
    StopCommand,
    TurningPointEvent,
)
from dallm.protocol.files import RESULT_FILE, ResultFile, write_json
from dallm.trainer import Trainer, isolated_rng, pick_device
from dallm.watch import Watch

__all__ = ["JobResult", "train"]


def _noop(_: JobEvent) -> None:
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(
    cfg: JobConfig,
    *,
    out_dir: Path | None = None,
    resume: Path | None = None,
    emit: Emit | None = None,
    poll: Poll | None = None,
) -> JobResult:
    """Run the job `cfg` into `out_dir` (default `cfg.out`), from scratch or from a checkpoint.

    `resume` is a checkpoint folder or an output folder (its latest checkpoint); without `out_dir`
    the run continues in the output folder the checkpoint belongs to.
    """
    ckpt = None
    if resume is not None:
        try:
            ckpt = find_checkpoint(Path(resume))
        except FileNotFoundError as e:
            raise ConfigError(f"--resume: {e}") from None
    if out_dir is None:
        out_dir = ckpt.parent.parent if ckpt is not None and ckpt.parent.name == "checkpoints" else cfg.out
    out = Path(out_dir)
    emit = emit or _noop

    device = pick_device(cfg.train.device)
    source = resolve_base(cfg.model.base)
    resolution = cfg.model.resolution or read_resolution(source, cfg.model.revision)
    images, classes = load_training_data(cfg.data, resolution)  # fails fast on a bad image
    for path, why in images.skipped + (classes.skipped if classes else []):
        emit(LogEvent(level="warning", message=f"skipped {path}: {why}"))

    seed_everything(cfg.seed)
    mixed = device.type == "cuda" and cfg.train.mixed_precision != "no"
    weight_dtype = (
        {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.mixed_precision] if mixed else torch.float32
    )
    parts = load_parts(cfg.model, device=device, weight_dtype=weight_dtype)
    if cfg.tokens.new or cfg.lora.text_encoder:  # a trained text encoder stays float32 (autocast computes)
        parts.text_encoder.to(torch.float32)
    trainer = Trainer(cfg, parts, images, classes, device)
    full = cfg.train.method == "full"  # CS / CS-Fluctuation are defined for LoRA only
    watch = Watch(parts.unet, cfg.monitor, start=monitor_start(cfg)) if cfg.monitor.cs and not full else None
    evaluator = None
    if cfg.samples.every or cfg.eval.every or cfg.eval.val_dir or cfg.eval.prompts:
        from dallm.evaluation import LiveEvaluator

        evaluator = LiveEvaluator(cfg, parts, out, emit, device, weight_dtype, images.captions)
        if full and ckpt is None:  # the base model's samples and KID features before its weights move
            evaluator.prime_base()
    job = Job(cfg, trainer, watch, evaluator, out, emit, poll)
    try:
        return job.run(ckpt)
    finally:
        job.log.close()


class Job:
    """The loop of one run and its bookkeeping: step counter, logs, checkpoints, commands."""

    def __init__(
        self, cfg, trainer: Trainer, watch: Watch | None, evaluator, out: Path, emit: Emit, poll
    ) -> None:
        self.cfg, self.trainer, self.watch, self.evaluator = cfg, trainer, watch, evaluator
        self.out, self.emit, self.poll = out, emit, poll or (lambda: None)
        self.ckpt_root = out / "checkpoints"
        out.mkdir(parents=True, exist_ok=True)
        self.log = MetricsLog(out / "metrics.jsonl")
        self.step = 0
        self.turning_point: int | None = None
        self._times: list[float] = []

    # -- the loop ------------------------------------------------------------------------------

    def run(self, ckpt: Path | None) -> JobResult:
        cfg = self.cfg
        if ckpt is not None:
            self._restore(load_checkpoint(ckpt))
            self.emit(LogEvent(message=f"resumed from {ckpt} at step {self.step}"))
        restored = self.log.truncate_after(self.step, ckpt)
        if restored:  # e.g. a resume from a checkpoint after a rollback finished at an earlier step
            self.emit(LogEvent(message=f"metrics of {restored} step(s) restored from {ckpt}"))
        save_config(cfg, self.out / "config.toml")
        self.emit(
            StartedEvent(
                start_step=self.step,
                total_steps=cfg.train.steps,
                device=str(self.trainer.device),
                trainable_params=self.trainer.trainable_params,
            )
        )
        if self.watch is not None and self.step == 0 and self.watch.wants_snapshot(0):
            self.watch.keep(self.trainer.state(0))
        while self.step < cfg.train.steps:
            while (cmd := self.poll()) is not None:  # every command queued between two steps
                result = self._obey(cmd)
                if result is not None:
                    return result
            t0 = time.perf_counter()
            values = self.trainer.step(self.step)
            self.step += 1
            self._times = (self._times + [time.perf_counter() - t0])[-10:]
            values["steps_per_s"] = len(self._times) / sum(self._times)
            found = self._watch(values)
            evaluated: dict[str, float] = {}
            if self.evaluator is not None and self.evaluator.due(self.step):
                with isolated_rng():  # sample grids go out as their own events; KID comes back
                    evaluated = self.evaluator.run(self.step)
            due = self.step % cfg.monitor.log_every == 0 or self.step == cfg.train.steps
            if due or evaluated:  # evaluation results are always logged
                self.log.write(self.step, values | evaluated)
                self.emit(MetricsEvent(step=self.step, values=values | evaluated))
            if self.step % cfg.checkpoint.every == 0:
                self.checkpoint()
            if found is not None and cfg.monitor.early_stop == "auto":
                return self.finish("early_stop", found)
        return self.finish("completed", self.step)

    def _watch(self, values: dict[str, float]) -> int | None:
        """CS and CS-Fluctuation into `values`; a snapshot at window boundaries; the new turning point."""
        if self.watch is None:
            return None
        reading = self.watch.update(self.step, values["lr"])
        if reading.cs is not None:
            values["cs"] = reading.cs
        if reading.cs_fluct is not None and reading.cs_fluct_step is not None:
            values["cs_fluct"] = reading.cs_fluct
            values["cs_fluct_step"] = float(reading.cs_fluct_step)
        if self.watch.wants_snapshot(self.step):
            self.watch.keep(self.trainer.state(self.step))
        tp = reading.turning_point
        if tp is None:
            return None
        self.turning_point = tp
        if self.cfg.monitor.early_stop != "off":
            self.emit(TurningPointEvent(step=tp, seen_at=self.step))
            action = "stopping with its weights" if self.cfg.monitor.early_stop == "auto" else "training on"
            self.emit(
                LogEvent(message=f"turning point (second valley of CS-Fluctuation) at step {tp}; {action}")
            )
        return tp

    def _obey(self, cmd: JobCommand | None) -> JobResult | None:
        if cmd is None:
            return None
        if isinstance(cmd, StopCommand):
            return self.finish("stopped", self.turning_point if self.turning_point is not None else self.step)
        if isinstance(cmd, CheckpointNowCommand):
            self.checkpoint()
            return None
        if isinstance(cmd, InterruptCommand):
            self.checkpoint()
            return self.finish("interrupted", self.step, write=False)
        if isinstance(cmd, RollbackCommand):
            return self._rollback(cmd.step, cmd.resume)
        self.emit(LogEvent(level="warning", message=f"ignored unknown command {cmd!r}"))
        return None

    # -- states: checkpoints, snapshots, rollback --------------------------------------------------

    def _state_at(self, step: int, need_optimizer: bool) -> TrainState | None:
        """The state of `step`: the current one, an in-memory snapshot, or a checkpoint on disk."""
        if step == self.step:
            return self.trainer.state(step)
        snap = self.watch.snapshot(step) if self.watch is not None else None
        if snap is not None and (snap.resumable or not need_optimizer):
            return snap
        folder = dict(list_checkpoints(self.ckpt_root)).get(step)
        return load_checkpoint(folder) if folder is not None else None

    def _restore(self, state: TrainState) -> None:
        self.trainer.load(state)
        self.step = state.step
        if self.watch is not None:
            self.watch.rewind(state.step, state.extra.get("history", []))
            for snap in state.extra.get("snapshots", []):
                if snap.step <= state.step:
                    self.watch.keep(snap)
            self.turning_point = self.watch.turning_point

    def checkpoint(self) -> Path:
        state = self.trainer.state(self.step)
        if self.watch is not None:
            state.extra["history"] = list(self.watch.history)
            state.extra["snapshots"] = [s.weights_only() for s in self.watch.snapshots()]
        writers = {
            "weights": lambda d: self.trainer.write_weights(d, state),
            "history": lambda d: self.log.save_history(d, self.step),
        }
        folder = save_checkpoint(self.ckpt_root, state, writers)
        protect = {self.turning_point} if self.turning_point is not None else set()
        prune_checkpoints(self.ckpt_root, self.cfg.checkpoint.keep, protect)
        self.emit(CheckpointEvent(step=self.step, path=str(folder.relative_to(self.out))))
        return folder

    def _rollback(self, step: int, resume: bool) -> JobResult | None:
        state = self._state_at(step, need_optimizer=resume) if 0 <= step <= self.step else None
        if state is None:
            have = sorted({s for s, _ in list_checkpoints(self.ckpt_root)} | set(self._snapshot_steps()))
            self.emit(
                LogEvent(level="error", message=f"rollback: no state kept for step {step} (have {have})")
            )
            return None
        reached = self.step
        if self.watch is not None:
            history = list(self.watch.history)
            self.watch.rewind(step, history)
            self.turning_point = self.watch.turning_point
        self.trainer.load(state)
        self.step = step
        self.log.truncate_after(step)
        self.emit(RolledBackEvent(step=step, resume=resume))
        if not resume:
            return self.finish("rolled_back", step, final_step=reached)
        for s, folder in list_checkpoints(self.ckpt_root):  # superseded history
            if s > step:
                shutil.rmtree(folder, ignore_errors=True)
        return None

    def _result_kid(self, extra: dict, final_step: int, result_step: int) -> float | None:
        """Validation KID of the weights written as the result (not of the last step's, when the
        job ends at its turning point or a rollback step)."""
        if result_step == final_step:
            return extra.get("kid_val")
        if result_step == self.turning_point and "turning_kid_val" in extra:
            return extra["turning_kid_val"]
        if self.evaluator is not None:
            return self.evaluator.kid_history.get(result_step, {}).get("kid_val")
        return None

    def _snapshot_steps(self) -> list[int]:
        return [s.step for s in self.watch.snapshots()] if self.watch is not None else []

    # -- the end -------------------------------------------------------------------------------

    def finish(
        self, reason: str, result_step: int, *, final_step: int | None = None, write: bool = True
    ) -> JobResult:
        final_step = self.step if final_step is None else final_step
        extra: dict = {}
        if write:
            state = self._state_at(result_step, need_optimizer=False)
            if state is None:  # only after a resume lost the snapshot: say so, use the current weights
                self.emit(
                    LogEvent(
                        level="warning",
                        message=f"weights of step {result_step} were not kept; the result is step {self.step}",
                    )
                )
                result_step, state = self.step, self.trainer.weights(self.step)
            if self.evaluator is not None:
                tp = self.turning_point
                tstate = self._state_at(tp, need_optimizer=False) if tp is not None else None
                turning = tstate.unet_lora if tstate is not None else None
                with isolated_rng():
                    extra = self.evaluator.finish(self.step, self.turning_point, turning)
            self.trainer.write_weights(self.out, state)
        result = JobResult(
            out_dir=self.out,
            reason=reason,  # type: ignore[arg-type]
            final_step=final_step,
            result_step=result_step,
            turning_point=self.turning_point,
            result_kid_val=self._result_kid(extra, final_step, result_step),
        )
        info = ResultFile(reason=result.reason, final_step=final_step, result_step=result_step,
                          turning_point=self.turning_point, eval=extra)  # fmt: skip
        write_json(self.out / RESULT_FILE, info)
        self.emit(result.finished_event())
        return result
