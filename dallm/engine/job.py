"""The loop of one training job, the same for every job kind (image, LLM): `Job.run` obeys `poll()`,
trains one step, watches CS / CS-Fluctuation, logs, evaluates, checkpoints, and stops at the last
step, when early stopping says so (`monitor.early_stop = "auto"`) or on a command. `Job.finish`
writes the result: the weights `dallm.monitor.early_stop.EarlyStop` chooses (the turning point's or
the best validation measure's exact weights, from an in-memory snapshot).

The loop asks its parts for neutral things only: the trainer (`Trainer`) for a step, the weights
and the state of a step; the evaluator (`dallm.eval.interface.Evaluator`) for what is due and its
validation measure; early stopping for snapshots and the choice. A job kind's setup
(`dallm.image.train`, `dallm.llm.train`; `dallm.engine.dispatch.train` picks it) builds them.
Results that come back after their step (a background evaluator) are `LateResults`'.

Steps count from 1; "step N" means the weights after N optimizer steps (step 0: before training).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from dallm.config import JobConfig, save_config
from dallm.engine.checkpoint import (
    TrainState,
    checkpoint_folders,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from dallm.engine.late_results import LateResults
from dallm.engine.metrics_log import MetricsLog
from dallm.engine.training import isolated_rng
from dallm.eval.interface import Arrived, Evaluator
from dallm.monitor.early_stop import EarlyStop, NoEarlyStop
from dallm.protocol import (
    CheckpointEvent,
    CheckpointNowCommand,
    CheckpointsDeletedEvent,
    Emit,
    InterruptCommand,
    JobCommand,
    JobResult,
    LogEvent,
    PhaseEmit,
    Poll,
    ProgressEvent,
    RollbackCommand,
    RolledBackEvent,
    StartedEvent,
    StopCommand,
    TurningPointEvent,
)
from dallm.protocol.files import RESULT_FILE, ResultFile, SelectionInfo, write_json
from dallm.protocol.labels import measure_label

if TYPE_CHECKING:
    from dallm.monitor.selection import Selection

__all__ = ["Job", "Trainer", "selection_info"]

PROGRESS_S = 1.0  # a ProgressEvent (the trainer's step, loss, lr) at most this often
PROGRESS_KEYS = ("loss", "lr", "steps_per_s", "cs")


class Trainer(Protocol):
    """What the loop asks of a job kind's trainer (`dallm.image.trainer.ImageTrainer`,
    `dallm.llm.trainer.LlmTrainer`)."""

    device: torch.device

    def step(self, step: int) -> dict[str, float]: ...  # train step `step + 1`: loss, lr, grad_norm

    def weights(self, step: int) -> TrainState: ...  # a copy of the trainable weights

    def state(self, step: int) -> TrainState: ...  # a copy of everything an exact resume needs

    def load(self, state: TrainState) -> None: ...

    def write_weights(self, folder: Path, state: TrainState) -> None: ...  # the result's files

    @property
    def trainable_params(self) -> int: ...


class Job:
    """The loop of one run and its bookkeeping: step counter, logs, checkpoints, commands."""

    def __init__(
        self,
        cfg: JobConfig,
        trainer: Trainer,
        early: EarlyStop | NoEarlyStop,
        evaluator: Evaluator,
        out: Path,
        emit: Emit,
        poll: Poll | None,
    ) -> None:
        self.cfg, self.trainer, self.early, self.evaluator = cfg, trainer, early, evaluator
        self.out, self.poll = out, poll or (lambda: None)
        self.emit = self.phases = emit if isinstance(emit, PhaseEmit) else PhaseEmit(emit)
        self.ckpt_root = out / "checkpoints"
        out.mkdir(parents=True, exist_ok=True)
        self.log = MetricsLog(out / "metrics.jsonl")
        self.late = LateResults(evaluator.pending, self.log, self.emit, self._write_checkpoint)
        self.step = 0
        self._times: list[float] = []
        self._progress_at = 0.0
        self._progress: dict[str, float] = {}  # the last known values (CS: once a window)

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
        schedule = self.evaluator.schedule
        measured = schedule.validation and schedule.measures  # the validation measure is among the values
        self.emit(
            StartedEvent(
                start_step=self.step,
                total_steps=cfg.train.steps,
                device=str(self.trainer.device),
                trainable_params=self.trainer.trainable_params,
                eval_every=schedule.every,
                samples_every=schedule.samples_every,
                job_kind=cfg.model.kind,
                validation_measure=self.evaluator.validation_measure if measured else None,
            )
        )
        if self.step == 0 and self.early.wants_snapshot(0):
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
            self._report_progress(values)
            if submitted := self.evaluator.due(self.step):
                with isolated_rng():  # inline: evaluated now; background: a copy of the weights goes
                    self.evaluator.submit(self.step, self.trainer.weights)
                self.late.say_behind()
            evaluated = self._arrive(self.evaluator.collect())
            due = self.step % cfg.monitor.log_every == 0 or self.step == cfg.train.steps
            if due or evaluated or submitted:  # evaluation steps are always logged
                self.late.row(self.step, values | evaluated)
            if self.step % cfg.checkpoint.every == 0:
                self.checkpoint(wait=False)
            self.late.write_deferred()
            if self.early.should_stop(self.step):
                return self.finish("early_stop")
        # notify / off with select = "turning": the user chose to train on, the result is the last step
        keep_last = self.early.select == "turning"
        return self.finish("completed", self.step if keep_last else None)

    def _report_progress(self, values: dict[str, float]) -> None:
        """The trainer's step and its last values, about once a second (and at the last step):
        the rows of the steps after a background evaluation still running wait for it."""
        self._progress |= {k: float(values[k]) for k in PROGRESS_KEYS if k in values}
        now = time.monotonic()
        if now - self._progress_at < PROGRESS_S and self.step != self.cfg.train.steps:
            return
        self._progress_at = now
        backlog = len(self.evaluator.pending())
        self.emit(ProgressEvent(step=self.step, values=dict(self._progress), backlog=backlog))

    # -- evaluations that come back ---------------------------------------------------------------

    def _arrive(self, arrived: list[Arrived]) -> dict[str, float]:
        """Record finished evaluations (in step order): the validation measure for early stopping,
        the values into their rows (`LateResults`). Returns the current step's values."""
        for a in arrived:
            self._record_validation(a.step, a.values, a.state)
        return self.late.arrive(arrived, self.step)

    def _record_validation(self, step: int, values: dict[str, float], state: TrainState | None) -> None:
        name = self.evaluator.validation_measure
        if name is not None and name in values:
            self.early.record_validation(step, values[name], values.get(f"{name}_std", 0.0), state)

    def _wait_evaluations(self) -> None:
        """Wait for every evaluation asked for up to now (a stop, a rollback, a command)."""
        self._wait_upto(self.step)

    def _wait_upto(self, step: int) -> None:
        """Wait for the evaluations up to `step` one at a time (oldest first), so that the held rows
        and deferred checkpoints before each go out as it comes back: a slow evaluator with a
        backlog shows its progress in metrics.jsonl instead of nothing until the last is back."""
        while ahead := [s for s in self.evaluator.pending() if s <= step]:
            self._arrive(self.evaluator.collect(wait_upto=min(ahead)))
            self.late.write_deferred()
        self._arrive(self.evaluator.collect())
        self.late.write_deferred()

    def _watch(self, values: dict[str, float]) -> int | None:
        """CS and CS-Fluctuation into `values`; a snapshot at window boundaries; the new turning point."""
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
            auto = self.cfg.monitor.early_stop == "auto"
            margin = self.early.margin if self.early.select in ("turning_then_best", "evidence") else 0
            stop_at = self.step + margin if auto else None
            self.emit(TurningPointEvent(step=tp, seen_at=self.step, stop_at=stop_at))
            action = "training on"
            if auto:
                measure = measure_label(self.evaluator.validation_measure)
                action = {
                    "turning_then_best": f"stopping at step {self.step + self.early.margin} with the best {measure} seen",
                    "evidence": f"stopping at step {self.step + self.early.margin}; the result chosen on the "
                    f"evidence ({measure}, prompt fidelity, paired differences)",
                }.get(self.early.select, "stopping")
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
        snap = self.early.snapshot(step)
        if snap is not None and (snap.resumable or not need_optimizer):
            return snap
        folder = dict(checkpoint_folders(self.ckpt_root)).get(step)
        return load_checkpoint(folder) if folder is not None else None

    def _restore(self, state: TrainState) -> None:
        self.trainer.load(state)
        self.step = state.step
        self.early.load_state_dict(state.extra, state.step)

    def checkpoint(self, wait: bool = True) -> Path | None:
        """A checkpoint of the current step. Its history must hold the KIDs up to its step: with
        evaluations of those still running it is kept in memory and written when they are back
        (`wait`: wait for them and write it now)."""
        self.phases.enter("checkpointing", self.step)
        state = self.trainer.state(self.step)
        if self.late.waits(state.step):
            if not wait:
                self.late.defer(state)
                return None
            self._wait_upto(state.step)
        return self._write_checkpoint(state)

    def _write_checkpoint(self, state: TrainState) -> Path:
        state.extra.update(self.early.state_dict())
        writers = {
            "weights": lambda d: self.trainer.write_weights(d, state),
            "history": lambda d: self.log.save_history(d, state.step),
        }
        folder = save_checkpoint(self.ckpt_root, state, writers)
        tp = self.early.turning_point
        protect = {tp} if tp is not None else set()
        deleted = prune_checkpoints(self.ckpt_root, self.cfg.checkpoint.keep, protect)
        self.emit(CheckpointEvent(step=state.step, path=str(folder.relative_to(self.out))))
        if deleted:  # the daemon's list (and the TUI's) must not offer them
            reason = f"checkpoint.keep = {self.cfg.checkpoint.keep}"
            self.emit(CheckpointsDeletedEvent(steps=deleted, reason=reason))
        return folder

    def _rollback(self, step: int, resume: bool) -> JobResult | None:
        self._wait_evaluations()  # what is still running belongs to the history being cut
        state = self._state_at(step, need_optimizer=resume) if 0 <= step <= self.step else None
        if state is None:
            kept = {s.step for s in self.early.snapshots()}
            have = sorted({s for s, _ in checkpoint_folders(self.ckpt_root)} | kept)
            self.emit(
                LogEvent(level="error", message=f"rollback: no state kept for step {step} (have {have})")
            )
            return None
        reached = self.step
        self.early.rewind(step)
        self.trainer.load(state)
        self.step = step
        self.log.truncate_after(step)
        self.emit(RolledBackEvent(step=step, resume=resume))
        if not resume:
            return self.finish("rolled_back", step, final_step=reached)
        gone = [s for s, _ in checkpoint_folders(self.ckpt_root) if s > step]
        for s, folder in checkpoint_folders(self.ckpt_root):  # superseded history
            if s > step:
                shutil.rmtree(folder, ignore_errors=True)
        if gone:
            self.emit(
                CheckpointsDeletedEvent(steps=gone, reason=f"superseded by the rollback to step {step}")
            )
        return None

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
        if write:
            with isolated_rng():  # final samples and measures of the stop step, before choosing
                extra = self.evaluator.finish(self.step)
            self.phases.enter("stopping", self.step)
            self._record_validation(self.step, extra, None)
        if result_step is None:
            choice = self.early.choose(self.step, self.evaluator.evidence)
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
            with isolated_rng():  # the measures of the complete weights the user gets
                tp = self.early.turning_point
                extra |= self.evaluator.result(result_step, tp, self.step, self._loaded(state))
            self.phases.enter("stopping", self.step)
            self.trainer.write_weights(self.out, state)
        tp, seen = self.early.turning_point, self.early.seen_at
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
        sel = choice.selection if choice is not None and choice.step == result_step else None
        if sel is not None:
            update: dict[str, Any] = {"selection": sel.describe()}
            if sel.reported_kid is not None:  # on references the choice did not use: no winner's curse
                update |= {"result_kid_val": sel.reported_kid, "result_kid_val_std": None}
            result = result.model_copy(update=update)
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
            selection=selection_info(sel) if sel is not None else None,
            eval=extra,
        )
        write_json(self.out / RESULT_FILE, info)
        self.emit(result.finished_event())
        return result


def selection_info(sel: Selection) -> SelectionInfo:
    """result.json's record of a choice on the evidence."""
    return SelectionInfo(
        signal=sel.signal,
        text=sel.describe(),
        reported_kid=sel.reported_kid,
        reported_on_held_out_half=sel.reported_on_held_out_half,
        runner_up=sel.runner_up,
        margin=list(sel.margin) if sel.margin is not None else None,
        paired=sel.paired,
        eligible=list(sel.eligible),
        excluded=list(sel.excluded),
    )
