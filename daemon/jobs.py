"""The job service: every change of a job's state goes through here, checked against the table in
daemon/jobstate.py, stored with its reason and published on the queue topic (as a JobStateEvent
carrying the whole row). So does every other change of a job's row a subscriber must see at once."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dallm.daemon.events import EventLog
from dallm.daemon.jobstate import check_transition
from dallm.daemon.store import Store
from dallm.protocol import QUEUE_TOPIC, JobState, JobStateEvent

log = logging.getLogger("dallm.daemon")


class JobService:
    def __init__(self, store: Store, events: EventLog) -> None:
        self.store = store
        self.events = events

    def submit(self, name: str, config: dict, priority: int, total_steps: int, retries: int,
               folder: Callable[[int], Path]) -> int:  # fmt: skip
        """A new job, queued; `folder(job)` names its output folder (it may hold the id)."""
        job = self.store.add_job(name, config, priority, total_steps, retries)
        self.store.update_job(job, out_dir=str(folder(job)))
        self.publish_state(job, None, "submitted")
        return job

    def set_state(self, job: int, state: JobState, reason: str, **fields: Any) -> None:
        """The one way a job changes state (ProtocolError "conflict" when the table forbids it)."""
        self.events.flush()
        if state not in ("running", "stopping"):  # a job that does not run is in no phase
            fields.setdefault("phase", None)
            fields.setdefault("phase_since", None)
        prev = self.store.transition(job, state, reason, check=check_transition, **fields)
        self.publish_state(job, prev, reason)
        log.info("job %s: %s -> %s (%s)", job, prev, state, reason)

    def set_priority(self, job: int, priority: int) -> None:
        self.store.update_job(job, priority=priority)
        self.publish_state(job, self.store.summary(job).state, f"priority set to {priority}")

    def publish_state(self, job: int, prev: str | None, reason: str) -> None:
        """The job's row as it is now, to every subscriber of the queue (`prev`: its state before)."""
        ev = JobStateEvent(job=self.store.summary(job), prev_state=prev, reason=reason)  # type: ignore[arg-type]
        self.events.add_event(job, QUEUE_TOPIC, "state", None, ev.model_dump_json(), None)
        self.events.flush()
