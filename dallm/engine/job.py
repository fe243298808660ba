"""The training job: `train(cfg)` runs one LoRA job, in the foreground or inside a worker process.

Reading order: `train` sets up (data first, so a bad image fails before the model loads), then
`Job.run` loops: obey `poll()`, train one step, watch CS / CS-Fluctuation, log, evaluate,
checkpoint, and stop at the last step, when early stopping says so (`monitor.early_stop = "auto"`)
or on a command. `Job.finish` writes the result: the weights `dallm.monitor.early_stop.EarlyStop` chooses
(the turning point's or the best validation KID's exact weights, from an in-memory snapshot).

Steps count from 1; "step N" means the weights after N optimizer steps (step 0: before training).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from dallm.config import ConfigError, JobConfig, save_config
from dallm.engine.checkpoint import (
    TrainState,
    checkpoint_folders,
    find_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from dallm.engine.metrics_log import MetricsLog
from dallm.eval.interface import steps_text
from dallm.image.data import load_training_data
from dallm.image.models import load_parts, read_resolution, resolve_base
from dallm.image.trainer import Trainer, isolated_rng, pick_device
from dallm.monitor.early_stop import EarlyStop
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
    PhaseEmit,
    Poll,
    RollbackCommand,
    RolledBackEvent,
    StartedEvent,
    StopCommand,
    TurningPointEvent,
)
from dallm.protocol.files import RESULT_FILE, ResultFile, write_json

__all__ = ["JobResult", "train"]

BEHIND_WARN = 3  # a background evaluator this many evaluations behind, and falling back, is said once


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
    emit = PhaseEmit(emit or _noop)
    if cfg.model.kind == "llm":
        from dallm.llm.train import train_llm

        return train_llm(cfg, out, ckpt, emit, poll)

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
    has_val_kid = cfg.eval.val_dir is not None and cfg.eval.every > 0
    early = EarlyStop(parts.unet, cfg, has_val_kid=has_val_kid) if cfg.monitor.cs and not full else None
    evaluator = None
    if cfg.samples.every or cfg.eval.every or cfg.eval.val_dir or cfg.eval.prompts:
        from dallm.eval.live import LiveEvaluator

        if cfg.eval.mode == "background" and not full:  # "full" changes the base weights themselves
            from dallm.eval.background import BackgroundEvaluator

            evaluator = BackgroundEvaluator(
                cfg, parts, out, emit, device, weight_dtype, images.captions, trainer.weights
            )
        else:
            evaluator = LiveEvaluator(cfg, parts, out, emit, device, weight_dtype, images.captions)
        if full and ckpt is None:  # the base model's samples and KID features before its weights move
            evaluator.prime_base()
    try:
        job = Job(cfg, trainer, early, evaluator, out, emit, poll)
        try:
            return job.run(ckpt)
        finally:
            job.log.close()
    finally:
        if evaluator is not None:
            evaluator.close()


class Job:
    """The loop of one run and its bookkeeping: step counter, logs, checkpoints, commands."""

    def __init__(
        self, cfg, trainer: Trainer, early: EarlyStop | None, evaluator, out: Path, emit: Emit, poll
    ) -> None:
        self.cfg, self.trainer, self.early, self.evaluator = cfg, trainer, early, evaluator
        self.out, self.poll = out, poll or (lambda: None)
        self.emit = self.phases = emit if isinstance(emit, PhaseEmit) else PhaseEmit(emit)
        self.ckpt_root = out / "checkpoints"
        out.mkdir(parents=True, exist_ok=True)
        self.log = MetricsLog(out / "metrics.jsonl")
        self.step = 0
        self._times: list[float] = []
        # Rows from the oldest step whose evaluation is still running (eval.mode = "background"):
        # written and sent once its KID is in them: one row and one MetricsEvent a step, in order.
        self._held: list[tuple[int, dict[str, float]]] = []
        self._deferred: list[TrainState] = []  # checkpoints waiting for the KIDs up to their step
        self._answered = False  # an evaluation came back (the evaluator's start-up is over)
        self._last_backlog = 0  # evaluations pending after the previous request
        self._behind_said = False

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
                eval_every=cfg.eval.every if self.evaluator is not None and self.evaluator.kid_on else 0,
                samples_every=cfg.samples.every
                if self.evaluator is not None and self.evaluator.samples_on
                else 0,
            )
        )
        if self.early is not None and self.step == 0 and self.early.wants_snapshot(0):
            self.early.keep(self.trainer.state(0))
        while self.step < cfg.train.steps:
            while (cmd := self.poll()) is not None:  # every command queued between two steps
                result = self._obey(cmd)
                if result is not None:
                    return result
            self.phases.enter("training", self.step)
            t0 = time.perf_counter()
            values = self.trainer.step(self.step)
            self.step += 1
            self._times = (self._times + [time.perf_counter() - t0])[-10:]
            values["steps_per_s"] = len(self._times) / sum(self._times)
            self._watch(values)
            evaluated: dict[str, float] = {}
            submitted = False
            if self.evaluator is not None:
                if submitted := self.evaluator.due(self.step):
                    with isolated_rng():  # inline: evaluated now; background: a copy of the weights goes
                        self.evaluator.submit(self.step, self.trainer.weights)
                    self._say_behind()
                evaluated = self._arrive(self.evaluator.collect())
            due = self.step % cfg.monitor.log_every == 0 or self.step == cfg.train.steps
            if due or evaluated or submitted:  # evaluation steps are always logged
                self._write_row(self.step, values | evaluated)
            if self.step % cfg.checkpoint.every == 0:
                self.checkpoint(wait=False)
            self._write_deferred()
            if self.early is not None and self.early.should_stop(self.step):
                return self.finish("early_stop")
        # notify / off with select = "turning": the user chose to train on, the result is the last step
        keep_last = self.early is None or self.early.select == "turning"
        return self.finish("completed", self.step if keep_last else None)

    # -- evaluations that come back ---------------------------------------------------------------

    def _arrive(self, arrived: list) -> dict[str, float]:
        """Record finished evaluations (`dallm.eval.interface.Arrived`, in step order): the validation
        KID for early stopping, earlier steps' values into their held rows (which go out once
        complete). Returns the current step's values (inline: evaluated just now)."""
        now: dict[str, float] = {}
        self._answered = self._answered or bool(arrived)
        for a in arrived:
            if self.early is not None and "kid_val" in a.values:
                self.early.record_kid(a.step, a.values, a.state)
            if a.step == self.step and not any(s == a.step for s, _ in self._held):
                now = a.values
                continue
            for s, row in self._held:
                if s == a.step:
                    row.update(a.values)
        self._release()
        return now

    def _say_behind(self) -> None:
        """Say once that the background evaluator cannot keep up: it has answered (its start-up is
        over), yet BEHIND_WARN or more are pending and none came back since the last request."""
        pending = self._pending()
        growing, self._last_backlog = len(pending) > self._last_backlog, len(pending)
        if self._behind_said or not self._answered or not growing or len(pending) < BEHIND_WARN:
            return
        self._behind_said = True
        msg = (
            f"the background evaluation is {len(pending)} evaluations behind training (pending: steps "
            f"{steps_text(pending)}); metrics rows and checkpoints from step {pending[0]} on, and the stop, "
            "wait for it; a larger eval.every or fewer eval images (eval.num_images, eval.kid_std_target, "
            "eval.max_images) let it keep up"
        )
        self.emit(LogEvent(level="warning", message=msg))

    def _pending(self) -> list[int]:
        return self.evaluator.pending() if self.evaluator is not None else []

    def _write_row(self, step: int, values: dict[str, float]) -> None:
        """The step's row into metrics.jsonl and its `MetricsEvent`: now, or held (in order) while an
        evaluation up to it runs, so that each step has one row and one event, with its KID."""
        if self._held or any(s <= step for s in self._pending()):
            self._held.append((step, dict(values)))
        else:
            self.log.write(step, values)
            self.emit(MetricsEvent(step=step, values=values))

    def _release(self) -> None:
        """Write and send the held rows before the oldest evaluation still running."""
        oldest = min(self._pending(), default=None)
        while self._held and (oldest is None or self._held[0][0] < oldest):
            step, row = self._held.pop(0)
            self.log.write(step, row)
            self.emit(MetricsEvent(step=step, values=row))

    def _wait_evaluations(self) -> None:
        """Wait for every evaluation asked for up to now (a stop, a rollback, a command)."""
        if self.evaluator is not None:
            self._wait_upto(self.step)

    def _wait_upto(self, step: int) -> None:
        """Wait for the evaluations up to `step` one at a time (oldest first), so that the held rows
        and deferred checkpoints before each go out as it comes back: a slow evaluator with a
        backlog shows its progress in metrics.jsonl instead of nothing until the last is back."""
        while ahead := [s for s in self._pending() if s <= step]:
            self._arrive(self.evaluator.collect(wait_upto=min(ahead)))
            self._write_deferred()
        self._arrive(self.evaluator.collect())
        self._write_deferred()

    def _watch(self, values: dict[str, float]) -> int | None:
        """CS and CS-Fluctuation into `values`; a snapshot at window boundaries; the new turning point."""
        if self.early is None:
            return None
        reading = self.early.observe(self.step, values["lr"])
        if reading.cs is not None:
            values["cs"] = reading.cs
        if reading.cs_fluct is not None and reading.cs_fluct_step is not None:
            values["cs_fluct"] = reading.cs_fluct
            values["cs_fluct_step"] = float(reading.cs_fluct_step)
        if self.early.wants_snapshot(self.step):
            self.early.keep(self.trainer.state(self.step))
        tp = reading.turning_point
        if tp is None:
            return None
        if self.cfg.monitor.early_stop != "off":
            self.emit(TurningPointEvent(step=tp, seen_at=self.step))
            action = "training on"
            if self.cfg.monitor.early_stop == "auto":
                action = (
                    f"stopping at step {self.step + self.early.margin} with the best validation KID seen"
                    if self.early.select == "turning_then_best"
                    else "stopping"
                )
            self.emit(
                LogEvent(message=f"turning point (second valley of CS-Fluctuation) at step {tp}; {action}")
            )
        return tp

    def _obey(self, cmd: JobCommand | None) -> JobResult | None:
        if cmd is None:
            return None
        if isinstance(cmd, StopCommand):
            return self.finish("stopped")
        if isinstance(cmd, CheckpointNowCommand):
            self.checkpoint()
            return None
        if isinstance(cmd, InterruptCommand):
            self.checkpoint()
            self._wait_evaluations()
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
        snap = self.early.snapshot(step) if self.early is not None else None
        if snap is not None and (snap.resumable or not need_optimizer):
            return snap
        folder = dict(checkpoint_folders(self.ckpt_root)).get(step)
        return load_checkpoint(folder) if folder is not None else None

    def _restore(self, state: TrainState) -> None:
        self.trainer.load(state)
        self.step = state.step
        if self.early is not None:
            self.early.rewind(state.step, state.extra.get("history", []))
            self.early.kids = {s: k for s, k in state.extra.get("kids", {}).items() if s <= state.step}
            for snap in state.extra.get("snapshots", []):
                if snap.step <= state.step:
                    self.early.keep(snap)

    def checkpoint(self, wait: bool = True) -> Path | None:
        """A checkpoint of the current step. Its history must hold the KIDs up to its step: with
        evaluations of those still running it is kept in memory and written when they are back
        (`wait`: wait for them and write it now)."""
        self.phases.enter("checkpointing", self.step)
        state = self.trainer.state(self.step)
        if any(s <= state.step for s in self._pending()):
            if not wait:
                self._deferred.append(state)
                return None
            self._wait_upto(state.step)
        return self._write_checkpoint(state)

    def _write_deferred(self) -> None:
        while self._deferred and not any(s <= self._deferred[0].step for s in self._pending()):
            self._write_checkpoint(self._deferred.pop(0))

    def _write_checkpoint(self, state: TrainState) -> Path:
        if self.early is not None:
            state.extra["history"] = list(self.early.history)
            state.extra["kids"] = dict(self.early.kids)
            state.extra["snapshots"] = [s.weights_only() for s in self.early.snapshots()]
        writers = {
            "weights": lambda d: self.trainer.write_weights(d, state),
            "history": lambda d: self.log.save_history(d, state.step),
        }
        folder = save_checkpoint(self.ckpt_root, state, writers)
        protect = {self.turning_point} if self.turning_point is not None else set()
        prune_checkpoints(self.ckpt_root, self.cfg.checkpoint.keep, protect)
        self.emit(CheckpointEvent(step=state.step, path=str(folder.relative_to(self.out))))
        return folder

    def _rollback(self, step: int, resume: bool) -> JobResult | None:
        self._wait_evaluations()  # what is still running belongs to the history being cut
        state = self._state_at(step, need_optimizer=resume) if 0 <= step <= self.step else None
        if state is None:
            have = sorted({s for s, _ in checkpoint_folders(self.ckpt_root)} | set(self._snapshot_steps()))
            self.emit(
                LogEvent(level="error", message=f"rollback: no state kept for step {step} (have {have})")
            )
            return None
        reached = self.step
        if self.early is not None:
            self.early.rewind(step)
        self.trainer.load(state)
        self.step = step
        self.log.truncate_after(step)
        self.emit(RolledBackEvent(step=step, resume=resume))
        if not resume:
            return self.finish("rolled_back", step, final_step=reached)
        for s, folder in checkpoint_folders(self.ckpt_root):  # superseded history
            if s > step:
                shutil.rmtree(folder, ignore_errors=True)
        return None

    @property
    def turning_point(self) -> int | None:
        return self.early.turning_point if self.early is not None else None

    def _snapshot_steps(self) -> list[int]:
        return [s.step for s in self.early.snapshots()] if self.early is not None else []

    @contextlib.contextmanager
    def _loaded(self, state: TrainState) -> Iterator[None]:
        """The complete weights of `state` (UNet and text-encoder LoRA, token rows) for a while."""
        saved = self.trainer.weights(self.step)
        self.trainer.load(state.weights_only())
        try:
            yield
        finally:
            self.trainer.load(saved)

    # -- the end -------------------------------------------------------------------------------

    def finish(
        self,
        reason: str,
        result_step: int | None = None,
        *,
        final_step: int | None = None,
        write: bool = True,
    ) -> JobResult:
        """End the run at the current step. `result_step` None: what early stopping chooses."""
        final_step = self.step if final_step is None else final_step
        self.phases.enter("stopping", self.step)
        self._wait_evaluations()  # the policy compares the KIDs of every evaluated step
        extra: dict = {}
        choice = None
        if write and self.evaluator is not None:
            with isolated_rng():  # final samples and KID of the stop step, before choosing
                extra = self.evaluator.finish(self.step)
            self.phases.enter("stopping", self.step)
            if self.early is not None and "kid_val" in extra:
                self.early.record_kid(self.step, extra, None)
        if result_step is None:
            choice = self.early.choose(self.step) if self.early is not None else None
            result_step = choice.step if choice is not None else self.step
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
            if self.evaluator is not None:  # KID of the complete weights the user gets
                with isolated_rng(), self._loaded(state):
                    extra |= self.evaluator.result(result_step, self.turning_point, self.step)
                self.phases.enter("stopping", self.step)
            self.trainer.write_weights(self.out, state)
        tp, seen = self.turning_point, self.early.seen_at if self.early is not None else None
        result = JobResult(
            out_dir=self.out,
            reason=reason,  # type: ignore[arg-type]
            final_step=final_step,
            result_step=result_step,
            turning_point=tp,
            seen_at=seen,
            result_kid_val=extra.get("result_kid_val"),
            result_kid_val_std=extra.get("result_kid_val_std"),
        )
        info = ResultFile(
            reason=result.reason,
            final_step=final_step,
            stop_step=self.step,
            result_step=result_step,
            turning_point=tp,
            seen_at=seen,
            total_steps=self.cfg.train.steps,
            steps_saved=1 - self.step / self.cfg.train.steps,  # counted from the stop step
            selected_by=choice.why if choice is not None else None,
            within_noise=list(choice.within_noise) if choice is not None else [],
            eval=extra,
        )
        write_json(self.out / RESULT_FILE, info)
        self.emit(result.finished_event())
        return result
