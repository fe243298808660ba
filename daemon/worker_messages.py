"""Worker messages into the daemon: engine events (into the event log), hello / done / error, and
commands down to a worker (held until its hello)."""

from __future__ import annotations

import logging
import sqlite3
import time

import zmq
from pydantic import ValidationError

from dallm.daemon.events import EventLog
from dallm.daemon.jobs import JobService
from dallm.daemon.reconcile import Reconciler
from dallm.daemon.scheduler import Scheduler, WorkerProc
from dallm.daemon.spill import STORE_ERRORS
from dallm.daemon.store import Store
from dallm.protocol import (
    WORKER_EVENT,
    WORKER_MESSAGE,
    FinishedEvent,
    JobCommand,
    MetricsEvent,
    RolledBackEvent,
    StartedEvent,
    WorkerDone,
    WorkerHello,
    job_event_adapter,
    job_topic,
    summary_changes,
    worker_message_adapter,
)

log = logging.getLogger("dallm.daemon")


class WorkerMessages:
    """Reads the worker socket into the event log and sends commands down it."""

    def __init__(self, workers: zmq.Socket, sched: Scheduler, store: Store, events: EventLog,
                 jobs: JobService, reconciler: Reconciler) -> None:  # fmt: skip
        self.workers = workers
        self.sched = sched
        self.store = store
        self.events = events
        self.jobs = jobs
        self.reconciler = reconciler
        self.waiting: list[bytes] | None = None  # a worker message held until the store works
        self.retry_at = 0.0

    def command(self, w: WorkerProc, cmd: JobCommand) -> None:
        if w.hello:
            self.workers.send_multipart([w.identity, cmd.model_dump_json().encode()])
        else:
            w.pending.append(cmd)

    def _on_worker(self, frames: list[bytes]) -> None:
        w = self.sched.by_identity.get(frames[0])
        if w is None or len(frames) < 3:
            return  # a worker of an earlier attempt, or garbage
        tag = frames[1]
        if tag == WORKER_EVENT and len(frames) >= 4:
            self._on_event(w, frames)
        elif tag == WORKER_MESSAGE:
            msg = worker_message_adapter.validate_json(frames[2])
            if isinstance(msg, WorkerHello):
                w.hello = True
                for cmd in w.pending:
                    self.workers.send_multipart([w.identity, cmd.model_dump_json().encode()])
                w.pending.clear()
            elif isinstance(msg, WorkerDone):
                w.done = msg.result
            else:
                w.error = msg
                self.events.job_log(w.job, "error", msg.message)
                if msg.traceback:
                    self.events.job_log(w.job, "debug", msg.traceback)

    def _on_event(self, w: WorkerProc, frames: list[bytes]) -> None:
        raw = frames[3]
        try:
            ev = job_event_adapter.validate_json(raw)
            t = float(frames[2])
        except (ValidationError, ValueError):
            log.warning("job %s: dropped an invalid event %r", w.job, raw[:200])
            return
        job = w.job
        self.events.update_row(job, summary_changes(ev))  # the fold of JobSummary.apply, into the store's row
        if type(ev) is MetricsEvent:  # the bulk: keep this path short
            w.last_step = ev.step
            self.events.add_event(job, job_topic(job), "metrics", ev.step, raw.decode(), None, t)
            return
        step = getattr(ev, "step", None)
        blob = frames[4] if len(frames) > 4 else None
        if isinstance(ev, StartedEvent | RolledBackEvent):
            # A resume (or a rollback) replaces the history after its step.
            after = ev.start_step if isinstance(ev, StartedEvent) else ev.step
            self.events.flush()
            try:
                if self.events.spill:
                    raise sqlite3.OperationalError(self.events.spill.reason)
                self.store.supersede(job, after, self.events.head + 1)
                # The summary's KID must be one the kept history has, not an erased evaluation's.
                kid, std = self.store.kid_val_at(job, after)
            except STORE_ERRORS:
                self.waiting, self.retry_at = frames, time.monotonic() + 0.1  # see drain
                return
            w.last_step = after
            step = None if isinstance(ev, StartedEvent) else ev.step
            if after > 0 or isinstance(ev, RolledBackEvent):
                # (an LLM job's ppl shows "-" until its next evaluation: not an erased figure)
                erased = {"validation": kid, "validation_std": std, "val_loss": None, "fidelity": None}
                self.events.update_row(job, {"kid_val": kid, "kid_val_std": std} | erased)
        elif isinstance(ev, FinishedEvent):
            w.finished = ev
        self.events.add_event(job, job_topic(job), ev.kind, step, raw.decode(), blob, t)
        if isinstance(ev, StartedEvent) and ev.start_step > 0:
            self.reconciler.backfill(job, ev.start_step)
        if isinstance(ev, RolledBackEvent):
            # Subscribers fold events into their rows (JobSummary.apply) but cannot know the KID the
            # kept history ends with: the whole row follows, as for any change of a job's row.
            self.events.flush()
            state = self.store.summary(job).state
            self.jobs.publish_state(job, state, f"rolled back to step {ev.step}")

    def drain(self, budget: int = 50_000) -> None:
        """Worker messages, in order. One whose handling writes the store itself (a resume's
        `started`, a `rolled_back`: they supersede history) waits while the store fails, and every
        later one with it, unread in ZMQ's queues (bounded by their high-water marks): none is lost."""
        for _ in range(budget):
            if self.waiting is not None:
                if time.monotonic() < self.retry_at:
                    break
                frames, self.waiting = self.waiting, None
            else:
                try:
                    frames = self.workers.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
            try:
                self._on_worker(frames)
            except (ValidationError, ValueError) as e:
                log.warning("bad worker message: %s", e)
            if self.waiting is not None:
                break
        self.events.flush()
