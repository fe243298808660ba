"""Batches of events the store could not take (a full disk, a locked database) wait here, oldest first,
and are written before any newer batch once the store takes writes again: nothing is dropped silently.

Where they wait: in memory up to SPILL_MAX_BYTES of event payload (data + blob); beyond it, each
job's share of a batch is appended to `SPILL_FILE` in that job's output folder (bounded by that disk
only; on the job's disk, not the home's, which is the one that is full when SQLite fails). Once a
batch went to disk every newer one goes there too, until the files are replayed into the store in
the order the events were numbered, published, and deleted. Only a batch that neither memory nor
the job folder can take is lost: every job it had events of gets a `history_gap` note (written to
its row when the store works again), so the job is never shown as if its history were whole.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import heapq
import json
import logging
import os
import sqlite3
import stat
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from dallm.daemon.store import SUMMARY_COLUMNS, EventRow
from dallm.jobfiles import UnsafeJobFolder, append_fd, read_fd
from dallm.protocol import QUEUE_TOPIC, envelope_frames, job_topic

log = logging.getLogger("dallm.daemon")

SPILL_MAX_BYTES = 64 * 1024 * 1024
SPILL_FILE = ".dallm-spill.jsonl"
# "database or disk is full" and "database is locked" are OperationalError; ENOSPC on the WAL is OSError.
STORE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.OperationalError, OSError)

Commit = Callable[[list[EventRow], dict[int, dict[str, Any]]], None]
Publish = Callable[[list[list[bytes]]], None]
FolderOf = Callable[[int], Path | None]


@dataclass
class Held:
    rows: list[EventRow]
    updates: dict[int, dict[str, Any]]
    frames: list[list[bytes]]
    size: int


@dataclass
class Lost:
    events: int = 0
    first_step: int | None = None
    last_step: int | None = None

    def note(self) -> str:
        steps = "" if self.first_step is None else f", steps {self.first_step}-{self.last_step}"
        return f"{self.events} event(s) lost while the store could not be written{steps}"


def encode_line(batch: int, job: int, rows: list[EventRow], updates: dict[str, Any]) -> bytes:
    out = [[*r[:8], base64.b64encode(r[8]).decode() if r[8] is not None else None] for r in rows]
    return (json.dumps({"b": batch, "job": job, "rows": out, "updates": updates}) + "\n").encode()


# The job row's columns a spilled line may set: progress only. The file lies in a job folder, so
# only known column names reach the store's SQL (values are parameters), only events of its own job,
# and never what the daemon derives itself (state, reason, name, out_dir, ...): a batch never sets
# those (state changes go through JobService), a forged line could.
NEVER_SPILLED = frozenset({"id", "name", "state", "reason", "out_dir", "priority", "created", "updated",
                           "attempts", "history_gap"})  # fmt: skip
UPDATABLE = frozenset(k.strip() for k in SUMMARY_COLUMNS.split(",")) - NEVER_SPILLED


def _decode(line: bytes, job: int) -> tuple[int, int, list[EventRow], dict[str, Any]]:
    """One line of job `job`'s spill file; ValueError (or KeyError, TypeError) when it is not one."""
    d = json.loads(line)
    rows: list[EventRow] = []
    for seq, prev, row_job, topic, kind, step, t, data, blob in d["rows"]:
        rows.append((int(seq), int(prev), int(row_job), str(topic), str(kind),
                     None if step is None else int(step), float(t), str(data),
                     None if blob is None else base64.b64decode(blob)))  # fmt: skip
    updates = dict(d["updates"])
    topics = (job_topic(job), QUEUE_TOPIC)
    if (
        int(d["job"]) != job
        or any(r[2] != job or r[3] not in topics for r in rows)
        or not UPDATABLE.issuperset(updates)
    ):
        raise ValueError("a line of another job, or a column a batch never sets")
    return int(d["b"]), job, rows, updates


def open_spill(path: Path) -> BinaryIO:
    """A spill file for reading, only if the daemon's user wrote it: in a folder of ours that no one
    else may write in, not a link, ours, 0600 (as append_line makes it); OSError or UnsafeJobFolder
    otherwise. A file someone else planted in a shared folder is never replayed."""
    f = os.fdopen(read_fd(path.parent, path.name), "rb")
    mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
    if mode != 0o600:
        f.close()
        raise PermissionError(errno.EPERM, f"has mode {mode:04o}, not the 0600 the daemon writes")
    return f


def append_line(path: Path, line: bytes) -> None:
    """Append one whole line or nothing: a failed write (ENOSPC) is cut off again, so the next
    append does not continue a torn line. 0600: the events are the job owner's."""
    fd = append_fd(path.parent, path.name)  # no planted link followed (dallm/jobfiles.py)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


@dataclass
class Spill:
    max_bytes: int = SPILL_MAX_BYTES
    folder_of: FolderOf | None = None  # a job's output folder; None: no disk spill for it
    held: deque[Held] = field(default_factory=deque)
    size: int = 0
    reason: str = ""  # the last store error, while batches wait
    lost: dict[int, Lost] = field(default_factory=dict)
    files: dict[int, Path] = field(default_factory=dict)  # job -> its spill file, while it has lines
    on_disk: dict[int, int] = field(default_factory=dict)  # job -> events in its file
    batches: int = 0  # numbers the lines of a batch, for the replay's order
    replayed: tuple[int, int] = (-1, -1)  # (batch, job) of the last line written: a cut replay resumes
    committed: int = 0  # rows up to this seq are in the store already (files a dead daemon left)
    unreadable: set[tuple[Path, int]] = field(default_factory=set)  # (file, line) counted lost

    def __bool__(self) -> bool:
        """True while the store cannot be written (batches wait, or a loss is not yet recorded)."""
        return bool(self.held) or bool(self.files) or bool(self.lost)

    def __len__(self) -> int:
        return sum(len(h.rows) for h in self.held) + sum(self.on_disk.values())

    def push(
        self, rows: list[EventRow], updates: dict[int, dict[str, Any]], frames: list[list[bytes]]
    ) -> None:
        size = sum(len(r[7]) + len(r[8] or b"") for r in rows)
        if self.files or (self.held and self.size + size > self.max_bytes):
            self._to_disk(rows, updates)  # its frames are made again from the rows when replayed
            return
        self.held.append(Held(rows, updates, frames, size))
        self.size += size

    def adopt(self, files: dict[int, Path], committed: int) -> tuple[int, dict[str, int]]:
        """Spill files a dead daemon left unreplayed: written before anything newer. Rows up to seq
        `committed` (the store's head) are in already. Returns the highest seq in the files and each
        topic's last, from which the daemon's numbering must go on."""
        top, topics = committed, {}
        for job, path in files.items():
            with contextlib.suppress(OSError, UnsafeJobFolder), open_spill(path) as f:
                for line in f:
                    try:
                        batch, _, rows, _ = _decode(line, job)
                    except (ValueError, KeyError, TypeError):
                        continue  # counted as lost when replayed
                    self.batches = max(self.batches, batch)
                    for r in rows:
                        if r[0] > committed:
                            top, topics[r[3]] = max(top, r[0]), max(topics.get(r[3], 0), r[0])
                            self.on_disk[job] = self.on_disk.get(job, 0) + 1
            self.files[job] = path
        self.committed = committed
        return top, topics

    def _to_disk(self, rows: list[EventRow], updates: dict[int, dict[str, Any]]) -> None:
        self.batches += 1
        by_job: dict[int, list[EventRow]] = {job: [] for job in updates}
        for row in rows:
            by_job.setdefault(row[2], []).append(row)
        for job, part in by_job.items():
            folder = self.folder_of(job) if self.folder_of is not None else None
            if folder is None:
                self._drop(job, part, "no job folder to spill to")
                continue
            path = folder / SPILL_FILE
            try:
                append_line(path, encode_line(self.batches, job, part, updates.get(job, {})))
            except (OSError, UnsafeJobFolder) as e:
                self._drop(job, part, f"cannot append to {path}: {getattr(e, 'strerror', None) or e}")
                continue
            if job not in self.files:
                log.warning("job %s: store unwritable and memory spill full: events go to %s", job, path)
            self.files[job] = path
            self.on_disk[job] = self.on_disk.get(job, 0) + len(part)

    def _drop(self, job: int, rows: list[EventRow], why: str, lines: int = 0) -> None:
        """Record a loss: `rows`, or `lines` of a spill file that cannot be read back."""
        if not rows and not lines:
            log.error("job %s: store unwritable, spill full (%s): its row's summary not updated", job, why)
            return
        lost = self.lost.setdefault(job, Lost())
        lost.events += len(rows) + lines
        steps = [r[5] for r in rows if r[5] is not None]
        if steps:
            lost.first_step = min(steps) if lost.first_step is None else min(lost.first_step, *steps)
            lost.last_step = max(steps) if lost.last_step is None else max(lost.last_step, *steps)
        log.error("job %s: store unwritable, spill full (%s): dropped %d event(s)", job, why, len(rows))

    def drain(self, commit: Commit, mark_gap: Callable[[int, str], None], publish: Publish) -> None:
        """Write the held batches in order, then the spill files, then the notes of any loss;
        `publish` gets the frames of each batch once written. Stops at the first store error and
        keeps the rest."""
        try:
            while self.held:
                h = self.held[0]
                commit(h.rows, h.updates)
                self.held.popleft()
                self.size -= h.size
                publish(h.frames)
            if self.files:
                self._replay(commit, publish)
            for job in list(self.lost):
                mark_gap(job, self.lost[job].note())
                del self.lost[job]
        except STORE_ERRORS as e:
            if not self.reason:
                log.error("store write failed (%s): %d event(s) held, retrying", e, len(self))
            self.reason = f"{type(e).__name__}: {e}"
            return
        if self.reason:
            log.warning("store writable again: held events written")
            self.reason = ""

    def _lines(self, job: int, path: Path) -> Iterator[tuple[int, int, list[EventRow], dict[str, Any]]]:
        """The lines of a spill file; one that cannot be read back is counted lost once (a replay
        that the store cuts short reads the file again)."""
        try:
            f = open_spill(path)
        except (OSError, UnsafeJobFolder) as e:
            if (path, 0) not in self.unreadable:
                self.unreadable.add((path, 0))
                self._drop(
                    job,
                    [],
                    f"cannot read {path}: {getattr(e, 'strerror', None) or e}",
                    lines=max(1, self.on_disk.get(job, 0)),
                )
            return
        with f:
            for n, line in enumerate(f, start=1):
                try:
                    yield _decode(line, job)
                except (ValueError, KeyError, TypeError):
                    if (path, n) not in self.unreadable:
                        self.unreadable.add((path, n))
                        self._drop(job, [], f"{path}:{n} is not a spilled batch", lines=1)

    def _replay(self, commit: Commit, publish: Publish) -> None:
        """The spill files, merged back into the order of their batches, each line written once
        (a replay cut short by the store failing again resumes after the last line written)."""
        lines = heapq.merge(*(self._lines(j, p) for j, p in self.files.items()), key=lambda x: (x[0], x[1]))
        for batch, job, rows, updates in lines:
            if (batch, job) <= self.replayed:
                continue
            rows = [r for r in rows if r[0] > self.committed]
            commit(rows, {job: updates} if updates else {})
            self.replayed = (batch, job)
            self.on_disk[job] = self.on_disk.get(job, 0) - len(rows)
            publish([envelope_frames(r[0], r[1], r[3], r[2], r[6], r[7], r[8]) for r in rows])
        for job, path in self.files.items():
            if (path, 0) in self.unreadable:
                continue  # not ours to delete (see open_spill): left for its owner to see
            with contextlib.suppress(OSError):
                path.unlink()
            log.warning("job %s: spilled events replayed into the store from %s", job, path)
        self.files.clear()
        self.on_disk.clear()
        self.unreadable.clear()

    def message(self) -> str:
        where = "held in memory" + (" and in the job folder(s)" if self.files else "")
        return (
            f"the daemon's store cannot be written ({self.reason}); {len(self)} event(s) {where} "
            "and retried, nothing is lost yet"
            if not self.lost
            else f"the daemon's store cannot be written ({self.reason}); events were dropped "
            f"for job(s) {', '.join(map(str, sorted(self.lost)))}"
        )
