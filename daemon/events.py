"""The daemon's event log: every event (a worker's engine events, job state changes) gets the next
daemon-wide sequence number, is committed to the store, then published, so whatever a subscriber
sees can be read back with a history request. Batches are committed in one transaction."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import zmq

from dallm.daemon.jobstate import check_transition
from dallm.daemon.spill import STORE_ERRORS, Spill
from dallm.daemon.store import EventRow, Store
from dallm.protocol import QUEUE_TOPIC, JobState, JobStateEvent, LogEvent, envelope_frames, job_topic

log = logging.getLogger("dallm.daemon")
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)


class EventLog:
    """Numbers, commits and publishes events; a part of Daemon (the attributes below are set by its
    __init__)."""

    store: Store
    pubs: list[zmq.Socket]
    seq: int
    topic_prev: dict[str, int]
    batch: list[EventRow]
    out_frames: list[list[bytes]]
    job_updates: dict[int, dict[str, Any]]
    folders: dict[int, Path]
    spill: Spill

    def add_event(self, job: int, topic: str, kind: str, step: int | None, data: str, blob: bytes | None,
                  t: float | None = None) -> int:  # fmt: skip
        self.seq += 1
        seq = self.seq
        prev = self.topic_prev.get(topic, 0)
        self.topic_prev[topic] = seq
        t = time.time() if t is None else t
        self.batch.append((seq, prev, job, topic, kind, step, t, data, blob))
        self.out_frames.append(envelope_frames(seq, prev, topic, job, t, data, blob))
        return seq

    def flush(self) -> None:
        """Commit the batch, after any batches a failed write left waiting (in order); publish what
        was committed. A failed write keeps the batch in the spill: nothing is published before the
        store has it, so a subscriber can always read back what it saw."""
        if self.batch or self.job_updates:
            self.spill.push(self.batch, self.job_updates, self.out_frames)
            self.batch, self.job_updates, self.out_frames = [], {}, []
        if not self.spill:
            return
        self.spill.drain(self.store.add_events, self.store.mark_gap, self._publish)

    def _publish(self, batch: list[list[bytes]]) -> None:
        more, last = _MORE, _LAST
        for pub in self.pubs:
            send = pub.send
            for frames in batch:  # a PUB never blocks: it drops at a subscriber's HWM
                for frame in frames[:-1]:
                    send(frame, more)
                send(frames[-1], last)

    def set_state(self, job: int, state: JobState, reason: str, **fields: Any) -> None:
        self.flush()
        prev = self.store.transition(job, state, reason, check=check_transition, **fields)
        self.publish_state(job, prev, reason)
        log.info("job %s: %s -> %s (%s)", job, prev, state, reason)

    def publish_state(self, job: int, prev: str | None, reason: str) -> None:
        ev = JobStateEvent(job=self.store.summary(job), prev_state=prev, reason=reason)  # type: ignore[arg-type]
        self.add_event(job, QUEUE_TOPIC, "state", None, ev.model_dump_json(), None)
        self.flush()

    def job_log(self, job: int, level: str, message: str) -> None:
        ev = LogEvent(level=level, message=message)  # type: ignore[arg-type]
        self.add_event(job, job_topic(job), "log", None, ev.model_dump_json(), None)

    def job_folder(self, job: int) -> Path | None:
        """The job's output folder, for the disk spill: known from its start (the store may be the
        thing failing), else read from the store."""
        folder = self.folders.get(job)
        if folder is None:
            with contextlib.suppress(*STORE_ERRORS):
                out = (self.store.job(job) or {}).get("out_dir")
                folder = Path(out) if out else None
        return folder if folder is not None and folder.is_dir() else None
