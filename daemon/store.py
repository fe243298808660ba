"""The daemon's store: SQLite in WAL mode, written by the daemon only (readers may open it too).

Tables: jobs (one row per job: config, state, priority, device, timestamps, reason/error, output,
turning point), transitions (every state change with its reason), events (the journal of every
published event: metrics, samples with their PNG thumbnail, checkpoints, logs, states; `seq` is the
daemon-wide sequence number, `superseded` marks history replaced by a rollback or a resume).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from dallm.protocol import CheckpointInfo, JobSummary, Transition, job_topic

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    config TEXT NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    started REAL,
    ended REAL,
    device TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    out_dir TEXT NOT NULL DEFAULT '',
    total_steps INTEGER NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    resume_path TEXT,
    pending TEXT,
    pid INTEGER,
    turning_point INTEGER,
    result_step INTEGER,
    kid_val REAL,
    kid_val_std REAL,
    steps_per_s REAL,
    history_gap TEXT,
    phase TEXT,
    phase_since REAL,
    eval_every INTEGER,
    samples_every INTEGER,
    eval_stop_seconds REAL,
    peak_rss_mb REAL,
    peak_gpu_mb REAL,
    kind TEXT,
    validation_measure TEXT,
    train_step INTEGER,
    eval_backlog INTEGER,
    loss REAL,
    lr REAL,
    stop_step INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, priority DESC, id);
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL,
    t REAL NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS transitions_job ON transitions (job_id, id);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    prev INTEGER NOT NULL DEFAULT 0,
    job_id INTEGER NOT NULL,
    topic TEXT NOT NULL,
    kind TEXT NOT NULL,
    step INTEGER,
    t REAL NOT NULL,
    data TEXT NOT NULL,
    blob BLOB,
    superseded INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_topic ON events (topic, seq);
-- Metric events (the bulk) are in the topic index only: inserting them stays cheap.
DROP INDEX IF EXISTS events_job;
CREATE INDEX IF NOT EXISTS events_job_misc ON events (job_id, kind) WHERE kind != 'metrics';
"""

SUMMARY_COLUMNS = (
    "id, name, state, priority, step, total_steps, device, reason, created, updated, attempts, out_dir, "
    "turning_point, result_step, kid_val, kid_val_std, steps_per_s, history_gap, "
    "phase, phase_since, eval_every, samples_every, eval_stop_seconds, peak_rss_mb, peak_gpu_mb, "
    "kind, validation_measure, train_step, eval_backlog, loss, lr, stop_step, validation, validation_std, "
    "val_loss, fidelity, base_fidelity, selection"
)
# Columns added since the first schema: a store written by an older daemon gets them on open.
ADDED_COLUMNS = {
    "kid_val_std": "REAL",
    "history_gap": "TEXT",
    "phase": "TEXT",
    "phase_since": "REAL",
    "eval_every": "INTEGER",
    "samples_every": "INTEGER",
    "eval_stop_seconds": "REAL",
    "peak_rss_mb": "REAL",
    "peak_gpu_mb": "REAL",
    "kind": "TEXT",
    "validation_measure": "TEXT",
    "train_step": "INTEGER",
    "eval_backlog": "INTEGER",
    "loss": "REAL",
    "lr": "REAL",
    "stop_step": "INTEGER",
    "validation": "REAL",
    "validation_std": "REAL",
    "val_loss": "REAL",
    "fidelity": "REAL",
    "base_fidelity": "REAL",
    "selection": "TEXT",
}

# seq, prev, job, topic, kind, step, t, data, blob
EventRow = tuple[int, int, int, str, str, int | None, float, str, bytes | None]


def summary_from_row(row: Sequence[Any]) -> JobSummary:
    keys = [k.strip() for k in SUMMARY_COLUMNS.split(",")]
    return JobSummary(
        **{k: v for k, v in zip(keys, row, strict=True) if v is not None or k in ("device", "reason")}
    )


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        have = {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}
        for column, kind in ADDED_COLUMNS.items():
            if column not in have:
                self.db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

    def close(self) -> None:
        self.db.close()

    # --- jobs --------------------------------------------------------------------------------

    def add_job(self, name: str, config: dict, priority: int, total_steps: int, retries: int) -> int:
        now = time.time()
        cur = self.db.execute(
            "INSERT INTO jobs (name, config, state, priority, created, updated, total_steps, retries, reason) "
            "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, 'submitted')",
            (name, json.dumps(config), priority, now, now, total_steps, retries),
        )
        job_id = int(cur.lastrowid or 0)
        self.db.execute(
            "INSERT INTO transitions (job_id, t, from_state, to_state, reason) VALUES (?, ?, NULL, 'queued', 'submitted')",
            (job_id, now),
        )
        return job_id

    def job(self, job_id: int) -> dict[str, Any] | None:
        cur = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,))
        row = cur.fetchone()
        return dict(zip([d[0] for d in cur.description], row, strict=True)) if row else None

    def find_job(self, ref: str) -> dict[str, Any] | None:
        """A job by id, else the newest job with that name."""
        if ref.isascii() and ref.isdigit():  # str.isdigit() admits "١" (int() reads it as 1)
            return self.job(int(ref))
        row = self.db.execute(
            "SELECT id FROM jobs WHERE name = ? ORDER BY id DESC LIMIT 1", (ref,)
        ).fetchone()
        return self.job(row[0]) if row else None

    def summary(self, job_id: int) -> JobSummary:
        row = self.db.execute(f"SELECT {SUMMARY_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return summary_from_row(row)

    def list_jobs(self, states: Iterable[str] | None = None, limit: int | None = None) -> list[JobSummary]:
        sql = f"SELECT {SUMMARY_COLUMNS} FROM jobs"
        args: list[Any] = []
        if states:
            states = list(states)
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args += states
        sql += " ORDER BY id"
        if limit:
            sql = f"SELECT * FROM ({sql} DESC LIMIT ?) ORDER BY id"
            args.append(limit)
        return [summary_from_row(r) for r in self.db.execute(sql, args)]

    def ids_in(self, *states: str) -> list[int]:
        q = f"SELECT id FROM jobs WHERE state IN ({','.join('?' * len(states))}) ORDER BY id"
        return [r[0] for r in self.db.execute(q, states)]

    def next_queued(self) -> int | None:
        row = self.db.execute(
            "SELECT id FROM jobs WHERE state = 'queued' ORDER BY priority DESC, id LIMIT 1"
        ).fetchone()
        return row[0] if row else None

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())

    def update_job(self, job_id: int, **fields: Any) -> None:
        fields["updated"] = time.time()
        cols = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def transition(
        self,
        job_id: int,
        to_state: str,
        reason: str,
        check: Callable[[int, str | None, Any], None] | None = None,
        **fields: Any,
    ) -> str | None:
        """Set the state (and other fields) and record the transition; returns the previous state.
        `check(job, prev, new)` raises when the change is not allowed (daemon.jobstate)."""
        row = self.db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        prev = row[0] if row else None
        if check is not None:
            check(job_id, prev, to_state)
        now = time.time()
        self.db.execute("BEGIN")
        try:
            self.update_job(job_id, state=to_state, reason=reason, **fields)
            self.db.execute(
                "INSERT INTO transitions (job_id, t, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?)",
                (job_id, now, prev, to_state, reason),
            )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return prev

    def mark_gap(self, job_id: int, note: str) -> None:
        """Record that events of the job were lost (notes of several losses are joined)."""
        self.db.execute(
            "UPDATE jobs SET history_gap = CASE WHEN history_gap IS NULL THEN ? ELSE history_gap || '; ' || ? END, "
            "updated = ? WHERE id = ?",
            (note, note, time.time(), job_id),
        )

    def log_events(self, job_id: int, since: int) -> list[tuple[int, float, str, str]]:
        """(seq, t, kind, data) of the job's log lines and state changes after `since`."""
        return self.db.execute(
            "SELECT seq, t, kind, data FROM events WHERE job_id = ? AND kind != 'metrics' AND seq > ? "
            "AND kind IN ('log', 'state') ORDER BY seq",
            (job_id, since),
        ).fetchall()

    def transitions(self, job_id: int) -> list[Transition]:
        rows = self.db.execute(
            "SELECT t, from_state, to_state, reason FROM transitions WHERE job_id = ? ORDER BY id", (job_id,)
        )
        return [Transition(t=t, from_state=f, to_state=s, reason=r) for t, f, s, r in rows]

    # --- events ------------------------------------------------------------------------------

    def head(self) -> int:
        return int(self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])

    def topic_heads(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT topic, MAX(seq) FROM events GROUP BY topic").fetchall())

    def add_events(self, rows: list[EventRow], job_updates: dict[int, dict[str, Any]] | None = None) -> None:
        """One transaction: the events and the job rows they change."""
        self.db.execute("BEGIN")
        try:
            self.db.executemany(
                "INSERT INTO events (seq, prev, job_id, topic, kind, step, t, data, blob) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            for job_id, fields in (job_updates or {}).items():
                self.update_job(job_id, **fields)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def supersede(self, job_id: int, after_step: int, before_seq: int) -> int:
        """Mark the job's step events after `after_step` (stored before `before_seq`) superseded."""
        cur = self.db.execute(
            "UPDATE events SET superseded = 1 WHERE topic = ? AND seq < ? AND step > ? AND superseded = 0 "
            "AND kind IN ('metrics', 'sample', 'checkpoint', 'turning_point')",
            (job_topic(job_id), before_seq, after_step),
        )
        return cur.rowcount

    def history(
        self, since: int, topics: list[str] | None, limit: int, kinds: list[str] | None = None
    ) -> list[tuple[int, int, int, str, int, float, str, bytes | None]]:
        """Rows (seq, prev, job, topic, superseded, t, data, blob), oldest first."""
        sql = "SELECT seq, prev, job_id, topic, superseded, t, data, blob FROM events WHERE seq > ?"
        args: list[Any] = [since]
        if topics is not None:
            sql += f" AND topic IN ({','.join('?' * len(topics))})"
            args += topics
        if kinds is not None:
            sql += f" AND kind IN ({','.join('?' * len(kinds))})"
            args += kinds
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        return self.db.execute(sql, args).fetchall()

    def checkpoints(self, job_id: int) -> list[CheckpointInfo]:
        rows = self.db.execute(
            "SELECT step, data, superseded FROM events WHERE job_id = ? AND kind != 'metrics' AND kind = 'checkpoint' "
            "ORDER BY seq",
            (job_id,),
        )
        return [CheckpointInfo(step=s, path=json.loads(d)["path"], superseded=bool(x)) for s, d, x in rows]

    def live_checkpoints(self, job_id: int) -> dict[int, str]:
        """step -> path of the job's checkpoints its history still offers: written, not superseded,
        not since said deleted (CheckpointsDeletedEvent)."""
        rows = self.db.execute(
            "SELECT kind, step, data FROM events WHERE job_id = ? AND kind != 'metrics' "
            "AND kind IN ('checkpoint', 'checkpoints_deleted') AND superseded = 0 ORDER BY seq",
            (job_id,),
        )
        out: dict[int, str] = {}
        for kind, step, data in rows:
            if kind == "checkpoint":
                out[step] = json.loads(data)["path"]
            else:
                for s in json.loads(data)["steps"]:
                    out.pop(s, None)
        return out

    def last_metrics(self, job_id: int) -> dict[str, float]:
        row = self.db.execute(
            "SELECT data FROM events WHERE topic = ? AND kind = 'metrics' AND superseded = 0 ORDER BY seq DESC LIMIT 1",
            (job_topic(job_id),),
        ).fetchone()
        return json.loads(row[0])["values"] if row else {}

    def kid_val_at(self, job_id: int, step: int) -> tuple[float | None, float | None]:
        """Validation KID (mean, std) of the last evaluation at or before `step` that is still part of
        the job's history (not superseded): what the summary shows after a rollback to `step`."""
        row = self.db.execute(
            "SELECT json_extract(data, '$.values.kid_val'), json_extract(data, '$.values.kid_val_std') "
            "FROM events WHERE topic = ? AND kind = 'metrics' AND superseded = 0 AND step <= ? "
            "AND json_extract(data, '$.values.kid_val') IS NOT NULL ORDER BY step DESC, seq DESC LIMIT 1",
            (job_topic(job_id), step),
        ).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def metric_steps(self, job_id: int, include_superseded: bool = False) -> list[int]:
        sql = "SELECT step FROM events WHERE topic = ? AND kind = 'metrics'"
        if not include_superseded:
            sql += " AND superseded = 0"
        return [r[0] for r in self.db.execute(sql + " ORDER BY seq", (job_topic(job_id),))]

    def event_steps(self, job_id: int, kind: str) -> set[int]:
        """Steps of the job's events of `kind` (not metrics) still in its history."""
        rows = self.db.execute(
            "SELECT step FROM events WHERE job_id = ? AND kind != 'metrics' AND kind = ? AND superseded = 0 "
            "AND step IS NOT NULL",
            (job_id, kind),
        )
        return {r[0] for r in rows}

    def last_event_seq(self, job_id: int, kind: str) -> int:
        """Seq of the job's last event of `kind` (not metrics); 0 when it has none."""
        row = self.db.execute(
            "SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ? AND kind != 'metrics' AND kind = ?",
            (job_id, kind),
        ).fetchone()
        return int(row[0])
