"""The daemon's event log: every event (a worker's engine events, job state changes) gets the next
daemon-wide sequence number, is committed to the store, then published, so whatever a subscriber
sees can be read back with a history request. Batches are committed in one transaction; a batch the
store cannot take waits in the spill (daemon/spill.py) and nothing after it is published first."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from dallm.daemon.spill import STORE_ERRORS, Publish, Spill
from dallm.daemon.store import EventRow, Store
from dallm.protocol import LogEvent, envelope_frames, job_topic


class EventLog:
    """Numbers, commits (in batches, through the spill when the store fails) and publishes events.
    `publish` sends committed frames on every event socket (Sockets.publish)."""

    def __init__(self, store: Store, publish: Publish) -> None:
        self._store = store
        self._publish = publish
        self._seq = store.head()
        self._topic_prev: dict[str, int] = store.topic_heads()
        self._batch: list[EventRow] = []
        self._frames: list[list[bytes]] = []
        self._updates: dict[int, dict[str, Any]] = {}
        self._folders: dict[int, Path] = {}  # job -> output folder, known without the store
        self.spill = Spill(folder_of=self.job_folder)  # batches the store could not take yet

    @property
    def head(self) -> int:
        """The last sequence number given out (committed or not)."""
        return self._seq

    def add_event(self, job: int, topic: str, kind: str, step: int | None, data: str, blob: bytes | None,
                  t: float | None = None) -> int:  # fmt: skip
        self._seq += 1
        seq = self._seq
        prev = self._topic_prev.get(topic, 0)
        self._topic_prev[topic] = seq
        t = time.time() if t is None else t
        self._batch.append((seq, prev, job, topic, kind, step, t, data, blob))
        self._frames.append(envelope_frames(seq, prev, topic, job, t, data, blob))
        return seq

    def update_row(self, job: int, changes: dict[str, Any]) -> None:
        """Columns of the job's row, committed with the batch (an event's summary_changes)."""
        upd = self._updates.get(job)
        if upd is None:
            upd = self._updates[job] = {}
        upd.update(changes)

    def flush(self) -> None:
        """Commit the batch, after any batches a failed write left waiting (in order); publish what
        was committed. A failed write keeps the batch in the spill: nothing is published before the
        store has it, so a subscriber can always read back what it saw."""
        if self._batch or self._updates:
            self.spill.push(self._batch, self._updates, self._frames)
            self._batch, self._updates, self._frames = [], {}, []
        if not self.spill:
            return
        self.spill.drain(self._store.add_events, self._store.mark_gap, self._publish)

    def discard(self) -> None:
        """Drop what is not yet flushed (the loop does, after a bug in one path)."""
        self._batch, self._frames, self._updates = [], [], {}

    def adopt(self, files: dict[int, Path]) -> int:
        """Spill files a dead daemon left (job -> file): held for replay, numbering after them;
        returns the number of events held."""
        top, topics = self.spill.adopt(files, self._store.head())
        self._seq = max(self._seq, top)
        for topic, seq in topics.items():
            self._topic_prev[topic] = max(self._topic_prev.get(topic, 0), seq)
        return len(self.spill)

    def job_log(self, job: int, level: str, message: str) -> None:
        ev = LogEvent(level=level, message=message)  # type: ignore[arg-type]
        self.add_event(job, job_topic(job), "log", None, ev.model_dump_json(), None)

    def remember_folder(self, job: int, folder: Path) -> None:
        self._folders[job] = folder

    def job_folder(self, job: int) -> Path | None:
        """The job's output folder, for the disk spill: known from its start (the store may be the
        thing failing), else read from the store."""
        folder = self._folders.get(job)
        if folder is None:
            with contextlib.suppress(*STORE_ERRORS):
                out = (self._store.job(job) or {}).get("out_dir")
                folder = Path(out) if out else None
        return folder if folder is not None and folder.is_dir() else None
