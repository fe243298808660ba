"""Recovery: the jobs a dead daemon left running (`recover`), and from the job folder what its engine
wrote to disk that the store lacks (events a killed, frozen or disk-starved daemon never committed),
put back as events so the history has no holes.

- On a resume (a StartedEvent with start_step > 0), up to that step: metric steps (metrics.jsonl),
  checkpoints (checkpoints/step-N, complete once renamed into place) and sample grids (samples/).
- On a daemon restart, for a job whose worker wrote its result.json during this attempt (the file is
  newer than the job's start) while the daemon was down: the same up to its last step, then the
  turning point and the finished event from result.json, and the job ends with that result
  (finished / stopped / stopped-early) instead of running again.

Every restore is said in the job's log, with the file it came from.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from dallm.daemon import identity
from dallm.daemon.events import EventLog
from dallm.daemon.jobs import JobService
from dallm.daemon.jobstate import CancelPending, decode_pending
from dallm.daemon.scheduler import result_outcome
from dallm.daemon.spill import SPILL_FILE, open_spill
from dallm.daemon.store import Store
from dallm.jobfiles import UnsafeJobFolder
from dallm.protocol import (
    CheckpointEvent,
    FinishedEvent,
    JobResult,
    MetricsEvent,
    RollbackCommand,
    SampleEvent,
    TurningPointEvent,
    job_topic,
    summary_changes,
)
from dallm.protocol.files import (
    METRICS_FILE,
    RESULT_FILE,
    ResultFile,
    checkpoint_folders,
    read_metrics,
    read_result,
)

log = logging.getLogger("dallm.daemon")
SAMPLES = "samples"
SAMPLE_INDEX = "index.jsonl"  # dallm.eval.sample_grids.INDEX (not imported: that module pulls in torch)
THUMBNAIL = 128  # pixels, the longer side of a restored sample's thumbnail
_GRID = re.compile(r"step-(\d+)")


Restored = CheckpointEvent | SampleEvent | TurningPointEvent | FinishedEvent


class Reconciler:
    """Puts back what the store lacks from the job folders, at start (`recover`) and on a resume
    (`backfill`); through the event log and the job service, as a worker's events would go."""

    def __init__(self, store: Store, events: EventLog, jobs: JobService, state_dir: Path) -> None:
        self.store = store
        self.events = events
        self.jobs = jobs
        self.state_dir = state_dir  # the workers' identity files (daemon/identity.py)

    def recover(self) -> None:
        """At start: jobs a dead daemon left running are queued again and resume from their last
        checkpoint; a stop or rollback asked before it died is asked again, a cancel is carried out; one
        whose worker wrote its result meanwhile ends with it. A stored pid is killed only when it is
        still our worker (daemon/identity.py). First, spill files it could not replay go in."""
        self._adopt_spills()
        for job in self.store.ids_in("running", "stopping"):
            row = self.store.job(job) or {}
            pid = row.get("pid")
            if pid and identity.is_our_worker(self.state_dir, job, pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            elif pid:
                log.info("job %s: pid %s is not its worker any more; left alone", job, pid)
            identity.forget(self.state_dir, job)
            if self.finished_while_down(job, row):
                continue
            if isinstance(decode_pending(row.get("pending")), CancelPending):
                self.jobs.set_state(
                    job, "cancelled", "cancelled by user", pid=None, pending=None, ended=time.time()
                )
                continue
            self.jobs.set_state(job, "queued", "daemon restarted after an unclean stop; resumes from its last checkpoint",
                                resume_path=row.get("out_dir"), pid=None)  # fmt: skip

    def _adopt_spills(self) -> None:
        files = {}
        for s in self.store.list_jobs():
            path = Path(s.out_dir) / SPILL_FILE
            if not s.out_dir or not os.path.lexists(path):
                continue
            try:  # only a file the daemon's user wrote, in a folder of its own (daemon/spill.py)
                open_spill(path).close()
            except (OSError, UnsafeJobFolder) as e:
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                log.error("job %s: %s not replayed: %s", s.id, path, why)
                continue
            files[s.id] = path
        if not files:
            return
        held = self.events.adopt(files)
        log.warning(
            "replaying %d spilled event(s) a daemon left in %s", held, ", ".join(map(str, files.values()))
        )
        self.events.flush()

    def finished_while_down(self, job: int, row: dict[str, Any]) -> bool:
        """End a job whose worker wrote result.json in this attempt while the daemon was down, with that
        result and its folder's events; False (nothing done) when it has no such result."""
        if not row.get("out_dir"):
            return False
        out = Path(row["out_dir"])
        result = read_result(out)
        try:
            written = (out / RESULT_FILE).stat().st_mtime
        except OSError:
            return False
        if result is None or result.reason == "interrupted" or written < (row.get("started") or 0):
            return (
                False  # none, one that asks to resume, or an earlier run's (a job rolled back after it ended)
            )
        pending = decode_pending(row.get("pending"))
        if isinstance(pending, RollbackCommand) and result.reason != "rolled_back":
            return False  # the rollback asked is still to do: requeued, it is asked again
        self.backfill(job, result.final_step)
        done = _job_result(out, result)
        have = self.store.event_steps(job, "turning_point")
        if done.turning_point is not None and done.turning_point not in have:
            seen = done.seen_at if done.seen_at is not None else result.final_step
            self._add(job, TurningPointEvent(step=done.turning_point, seen_at=seen), done.turning_point)
        if self.store.last_event_seq(job, "finished") <= self.store.last_event_seq(job, "started"):
            self._add(job, done.finished_event(), None)
        state, reason, _ = result_outcome(done, shutting_down=False)
        reason += f" (while the daemon was down; from {out / RESULT_FILE})"
        if row.get("history_gap"):
            reason += f"; history incomplete: {row['history_gap']}"
        self.events.job_log(job, "warning", f"the worker finished while the daemon was down: {reason}")
        self.jobs.set_state(job, state, reason, pid=None, pending=None, ended=min(written, time.time()),  # type: ignore[arg-type]
                            step=result.final_step, result_step=done.result_step, turning_point=done.turning_point)  # fmt: skip
        return True

    def backfill(self, job: int, upto: int) -> None:
        """Metric steps, checkpoints and sample grids up to `upto` that the store lacks."""
        self.events.flush()
        out = Path((self.store.job(job) or {}).get("out_dir") or ".")
        restored = {
            f"metric step(s) up to {upto} restored from {METRICS_FILE}": self._metrics(job, out, upto),
            f"checkpoint event(s) up to {upto} restored from {out / 'checkpoints'}": self._checkpoints(
                job, out, upto
            ),
            f"sample grid event(s) up to {upto} restored from {out / SAMPLES}": self._samples(job, out, upto),
        }
        for what, n in restored.items():
            if n:
                self.events.job_log(job, "warning", f"{n} {what}")

    def _metrics(self, job: int, out: Path, upto: int) -> int:
        have = set(self.store.metric_steps(job))
        missing = [
            r for r in read_metrics(out / METRICS_FILE) if r["step"] <= upto and int(r["step"]) not in have
        ]
        for row in missing:
            values = {k: float(v) for k, v in row.items() if k != "step" and math.isfinite(v)}
            step = int(row["step"])
            data = MetricsEvent(step=step, values=values).model_dump_json()
            self.events.add_event(job, job_topic(job), "metrics", step, data, None)
        return len(missing)

    def _checkpoints(self, job: int, out: Path, upto: int) -> int:
        have = self.store.event_steps(job, "checkpoint")
        missing = [(s, p) for s, p in checkpoint_folders(out / "checkpoints") if s <= upto and s not in have]
        for step, folder in missing:
            self._add(job, CheckpointEvent(step=step, path=str(folder.relative_to(out))), step)
        return len(missing)

    def _samples(self, job: int, out: Path, upto: int) -> int:
        have = self.store.event_steps(job, "sample")
        missing = sorted((s, g) for s, g in sample_grids(out).items() if s <= upto and s not in have)
        for step, (path, prompts) in missing:
            self._add(
                job, SampleEvent(step=step, path=path, png=thumbnail(out / path), prompts=prompts), step
            )
        return len(missing)

    def _add(self, job: int, ev: Restored, step: int | None) -> None:
        """As a worker sends it: a sample's thumbnail travels as a blob beside the JSON."""
        blob = ev.png if isinstance(ev, SampleEvent) and ev.png else None
        data = ev.model_dump_json(exclude={"png"}) if blob else ev.model_dump_json()
        self.events.add_event(job, job_topic(job), ev.kind, step, data, blob)
        self.events.update_row(job, summary_changes(ev))


def sample_grids(out: Path) -> dict[int, tuple[str, list[str]]]:
    """step -> (path relative to `out`, prompts) of the sample grids on disk: from samples/index.jsonl
    (the last record of a step wins), else the samples/step-N.png files. Only files inside `out`."""
    folder = out / SAMPLES
    found: dict[int, tuple[str, list[str]]] = {}
    try:
        lines = (folder / SAMPLE_INDEX).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
        for p in folder.glob("step-*.png"):
            m = _GRID.fullmatch(p.stem)
            if m:
                found[int(m.group(1))] = (f"{SAMPLES}/{p.name}", [])
    for line in lines:
        try:
            rec = json.loads(line)
            step, path, prompts = rec["step"], rec["path"], rec.get("prompts") or []
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line of an engine killed while writing
        if isinstance(step, int) and isinstance(path, str) and _inside(out, path):
            found[step] = (path, [str(p) for p in prompts])
    return found


def _inside(out: Path, rel: str) -> bool:
    try:
        path = (out / rel).resolve()
        return path.is_relative_to(out.resolve()) and path.is_file()
    except OSError:
        return False


def thumbnail(path: Path) -> bytes:
    """A small PNG of the grid (b"" when it cannot be read: the event still says where it is)."""
    from PIL import Image  # only when a sample is restored: the daemon starts without it

    try:
        with Image.open(path) as im:
            im.thumbnail((THUMBNAIL, THUMBNAIL))
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")
            return buf.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError):
        return b""


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _job_result(out: Path, result: ResultFile) -> JobResult:
    return JobResult(
        out_dir=out,
        reason=result.reason,
        final_step=result.final_step,
        result_step=result.result_step,
        turning_point=result.turning_point,
        seen_at=result.seen_at,
        result_kid_val=_number(result.eval.get("result_kid_val")),
        result_kid_val_std=_number(result.eval.get("result_kid_val_std")),
    )
