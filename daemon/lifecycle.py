"""A job's life in the daemon: the next queued job onto a free slot, its worker started (or the job
failed alone when it cannot be), an ended worker reaped into the job's final state, and shutdown
(every running job checkpoints first)."""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

from dallm.daemon import identity
from dallm.daemon.events import EventLog
from dallm.daemon.jobs import JobService
from dallm.daemon.jobstate import decode_pending
from dallm.daemon.scheduler import Scheduler, outcome
from dallm.daemon.store import Store
from dallm.daemon.worker_messages import WorkerMessages
from dallm.jobfiles import make_job_folder, write_file
from dallm.protocol import (
    CheckpointsDeletedEvent,
    InterruptCommand,
    JobState,
    RollbackCommand,
    StopCommand,
    job_topic,
)

log = logging.getLogger("dallm.daemon")


class JobLifecycle:
    """Starts, reaps and shuts down jobs; every state it gives a job goes through the job service."""

    def __init__(self, store: Store, sched: Scheduler, events: EventLog, jobs: JobService,
                 worker_messages: WorkerMessages, state_dir: Path, shutdown_timeout: float,
                 roots: tuple[Path, ...] = ()) -> None:  # fmt: skip
        self.store = store
        self.sched = sched
        self.events = events
        self.jobs = jobs
        self.worker_messages = worker_messages
        self.state_dir = state_dir  # the workers' identity files (daemon/identity.py)
        self.shutting_down = False
        self.shutdown_deadline = 0.0
        self.shutdown_timeout = shutdown_timeout
        self.roots = roots  # the folders jobs may use: a job folder's chain is checked from its root

    def schedule(self) -> None:
        while not self.shutting_down and self.sched.free_slot() is not None:
            job = self.store.next_queued()
            if job is None:
                return
            row = self.store.job(job)
            assert row is not None
            slot = self.sched.slot_for(job, json.loads(row["config"]))
            if slot is None:
                return  # it waits for a GPU of its own (packing refused; the scheduler logged why)
            self.start_job(job, slot)

    def start_job(self, job: int, slot: int) -> None:
        row = self.store.job(job)
        assert row is not None
        out = Path(row["out_dir"])
        attempt = row["attempts"] + 1
        resume: Path | None = Path(row["resume_path"]) if row["resume_path"] else None
        if resume is not None and resume == out and not any((out / "checkpoints").glob("step-*")):
            resume = None  # nothing saved yet: start over
        try:
            make_job_folder(out, self.roots)  # ours, 0700, no link planted on the way (dallm/jobfiles.py)
            self.events.remember_folder(job, out)
            config = json.loads(row["config"])
            cfg_path = write_file(
                out, "job-config.json", json.dumps(for_slot(config, self.sched.devices[slot])).encode()
            )
            w = self.sched.start(job, attempt, cfg_path, out, resume, out / "worker.log", slot, config)
        except Exception as e:  # a job that cannot start fails alone; the daemon serves on
            log.exception("job %s: cannot start", job)
            self.jobs.set_state(
                job, "failed", f"cannot start a worker: {type(e).__name__}: {e}", attempts=attempt
            )
            return
        identity.remember(self.state_dir, job, w.proc.pid, w.token)
        pending = decode_pending(row["pending"])
        if isinstance(pending, StopCommand | RollbackCommand):  # asked before a restart: ask again
            w.pending.append(pending)
        how = (
            f"resuming from {resume.name if resume != out else 'its last checkpoint'}"
            if resume
            else "from step 0"
        )
        state: JobState = "running"
        reason = f"started on {w.device} (attempt {attempt}, {how})"
        if isinstance(pending, RollbackCommand) and not pending.resume:
            # It trains no step: it only writes (and evaluates) the result of `pending.step`.
            state, reason = (
                "stopping",
                f"writing the result of step {pending.step} on {w.device} (attempt {attempt})",
            )
        now = time.time()  # until the engine names its phase, the worker loads the model and data
        self.jobs.set_state(job, state, reason, attempts=attempt, pid=w.proc.pid, device=w.device,
                            started=now, phase="loading", phase_since=now)  # fmt: skip

    def end_of_shutdown(self, now: float) -> bool:
        """Past the deadline, workers still running are killed; True once none is left."""
        if now > self.shutdown_deadline:
            for w in list(self.sched.by_job.values()):
                self.sched.kill(w, signal.SIGKILL)
        return not self.sched.by_job

    def reap(self) -> None:
        for w in self.sched.ended(time.time()):
            self.worker_messages.drain()
            if self.events.spill or self.worker_messages.waiting is not None:
                return  # the store cannot take its events (or its end) yet: reaped once it can
            row = self.store.job(w.job) or {}
            state, reason, resume = outcome(w, self.shutting_down, int(row.get("retries") or 0))
            if w.proc.returncode not in (0, None) and w.done is None and w.error is None:
                self.events.job_log(
                    w.job, "error", f"worker {reason}; see {Path(row.get('out_dir', '')) / 'worker.log'}"
                )
            fields: dict[str, Any] = {"pid": None, "resume_path": row.get("out_dir") if resume else None}
            if not resume:
                fields["pending"] = None  # the stop/rollback/cancel it carried is done
            if state not in ("queued",):
                fields["ended"] = time.time()
            if w.done is not None:
                fields |= {"result_step": w.done.result_step, "turning_point": w.done.turning_point}
            if row.get("history_gap") and not resume:  # never shown as if whole
                reason += f"; history incomplete: {row['history_gap']}"
            self.announce_gone_checkpoints(w.job, Path(row.get("out_dir") or "."))
            self.jobs.set_state(w.job, state, reason, **fields)
            self.sched.release(w)
            identity.forget(self.state_dir, w.job)

    def announce_gone_checkpoints(self, job: int, out: Path) -> None:
        """The checkpoints the job's history offers that are no longer on disk, said deleted: what
        the engine did not say (an older engine, a folder removed by hand) is not offered either."""
        gone = sorted(s for s, p in self.store.live_checkpoints(job).items() if not (out / p).is_dir())
        if gone:
            ev = CheckpointsDeletedEvent(steps=gone, reason="not on disk when the job ended")
            self.events.add_event(job, job_topic(job), ev.kind, None, ev.model_dump_json(), None)

    def begin_shutdown(self, hurry: bool = False) -> None:
        """Every running job checkpoints first, for up to shutdown_timeout; `hurry`: kill them now."""
        if hurry:
            self.shutdown_deadline = 0.0
        if self.shutting_down:
            return
        self.shutting_down = True
        self.shutdown_deadline = time.time() + self.shutdown_timeout
        log.info("shutting down: %d running job(s) checkpoint first", len(self.sched.by_job))
        for w in self.sched.by_job.values():
            self.worker_messages.command(w, InterruptCommand())


def for_slot(config: dict, device: str) -> dict:
    """A worker sees one GPU (CUDA_VISIBLE_DEVICES), as cuda:0: `cuda:N` in a config means that one."""
    train = config.get("train", {})
    if device != "cpu" and str(train.get("device", "")).startswith("cuda:"):
        config = {**config, "train": {**train, "device": "cuda"}}
    return config
