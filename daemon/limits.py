"""Bounds on what the daemon holds for its clients.

Memory: a reply is at most MAX_REPLY_BYTES (a history page stops early, `more` set), and at most
CONTROL_SNDHWM replies wait for one client (ZMQ's send high-water mark per peer), so a client that
never reads costs the daemon at most CONTROL_SNDHWM x MAX_REPLY_BYTES = 128 MiB, plus what waits in
its receive pipe (CONTROL_RCVHWM x MAX_CONTROL_BYTES, and only while the loop is behind).
Outstanding requests: a client whose queue is full is not served for STALL_S (its requests are
dropped unread: it times out) so the daemon also spends no time building replies nobody takes.
"""

from __future__ import annotations

import time

MAX_HISTORY_PAGE = 5000  # events per history reply, whatever the request asks
MAX_REPLY_BYTES = 256 << 10
CONTROL_SNDHWM = 512  # replies waiting per client (a pipelining client may send hundreds)
CONTROL_RCVHWM = 100  # requests waiting per client before ZMQ stops reading its connection
STALL_S = 1.0


def page_rows(rows: list[tuple], limit: int, max_bytes: int = MAX_REPLY_BYTES) -> tuple[list[tuple], bool]:
    """The first rows of a history page that fit in max_bytes (at least one), and whether more
    events follow. rows: (seq, prev, job, topic, superseded, t, data, blob), up to `limit`."""
    total = 0
    for i, row in enumerate(rows):
        total += len(row[6]) + (len(row[7]) if row[7] else 0) + 120  # 120: the envelope's own JSON
        if total > max_bytes and i > 0:
            return rows[:i], True
    return rows, len(rows) == limit


class StalledPeers:
    """Clients whose reply queue was full at the last send: skipped for STALL_S."""

    def __init__(self, stall_s: float = STALL_S) -> None:
        self.stall_s = stall_s
        self.until: dict[bytes, float] = {}
        self.dropped = 0

    def stalled(self, ident: bytes, now: float | None = None) -> bool:
        t = self.until.get(ident)
        if t is None:
            return False
        if (time.monotonic() if now is None else now) >= t:
            del self.until[ident]
            return False
        self.dropped += 1
        return True

    def mark(self, ident: bytes) -> None:
        self.dropped += 1
        if len(self.until) > 10_000:  # forget stale entries of clients long gone
            now = time.monotonic()
            self.until = {k: v for k, v in self.until.items() if v > now}
        self.until[ident] = time.monotonic() + self.stall_s
