"""Batches of events the store could not take (a full disk, a locked database) wait here, oldest first,
and are written before any newer batch once the store takes writes again: nothing is dropped silently.

Bound: SPILL_MAX_BYTES of event payload (data + blob) held in memory. A batch that would go beyond
it is dropped, and every job it had events of gets a `history_gap` note (written to its row when the
store works again) so the job is never shown as if its history were whole.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dallm.daemon.store import EventRow

log = logging.getLogger("dallm.daemon")

SPILL_MAX_BYTES = 64 * 1024 * 1024
# "database or disk is full" and "database is locked" are OperationalError; ENOSPC on the WAL is OSError.
STORE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.OperationalError, OSError)

Commit = Callable[[list[EventRow], dict[int, dict[str, Any]]], None]


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


@dataclass
class Spill:
    max_bytes: int = SPILL_MAX_BYTES
    held: deque[Held] = field(default_factory=deque)
    size: int = 0
    reason: str = ""  # the last store error, while batches wait
    lost: dict[int, Lost] = field(default_factory=dict)

    def __bool__(self) -> bool:
        """True while the store cannot be written (batches wait, or a loss is not yet recorded)."""
        return bool(self.held) or bool(self.lost)

    def __len__(self) -> int:
        return sum(len(h.rows) for h in self.held)

    def push(
        self, rows: list[EventRow], updates: dict[int, dict[str, Any]], frames: list[list[bytes]]
    ) -> None:
        size = sum(len(r[7]) + len(r[8] or b"") for r in rows)
        if self.held and self.size + size > self.max_bytes:
            self._drop(rows)
            return
        self.held.append(Held(rows, updates, frames, size))
        self.size += size

    def _drop(self, rows: list[EventRow]) -> None:
        for row in rows:
            lost = self.lost.setdefault(row[2], Lost())
            lost.events += 1
            step = row[5]
            if step is not None:
                lost.first_step = step if lost.first_step is None else min(lost.first_step, step)
                lost.last_step = step if lost.last_step is None else max(lost.last_step, step)
        log.error(
            "store unwritable and spill full (%d bytes held): dropped %d event(s)", self.size, len(rows)
        )

    def drain(self, commit: Commit, mark_gap: Callable[[int, str], None]) -> list[list[bytes]]:
        """Write the held batches in order (then the notes of any loss); returns the frames of the
        batches written, to publish. Stops at the first store error and keeps the rest."""
        out: list[list[bytes]] = []
        try:
            while self.held:
                h = self.held[0]
                commit(h.rows, h.updates)
                self.held.popleft()
                self.size -= h.size
                out += h.frames
            for job in list(self.lost):
                mark_gap(job, self.lost[job].note())
                del self.lost[job]
        except STORE_ERRORS as e:
            if not self.reason:
                log.error("store write failed (%s): %d event(s) held in memory, retrying", e, len(self))
            self.reason = f"{type(e).__name__}: {e}"
            return out
        if self.reason:
            log.warning("store writable again: held events written")
            self.reason = ""
        return out

    def message(self) -> str:
        return (
            f"the daemon's store cannot be written ({self.reason}); {len(self)} event(s) held in memory "
            "and retried, nothing is lost yet"
            if not self.lost
            else f"the daemon's store cannot be written ({self.reason}); events were dropped "
            f"for job(s) {', '.join(map(str, sorted(self.lost)))}"
        )
