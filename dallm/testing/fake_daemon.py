"""`FakeConnection`: an in-memory daemon behind the TUI's `Connection` interface, for tests, the
TUI benchmark and `dallm-tui --demo`. Rows change by the protocol's own reducer (`JobSummary.apply`),
so the fake and the daemon cannot drift apart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from dallm.config import ConfigError
from dallm.protocol import (
    QUEUE_TOPIC,
    AnyEvent,
    CheckpointEvent,
    CheckpointInfo,
    EventEnvelope,
    HostUsage,
    JobDetail,
    JobState,
    JobStateEvent,
    JobSummary,
    MetricsEvent,
    ResourcesReply,
    Transition,
    WorkerLogReply,
    job_topic,
)
from dallm.tui.connection import Action, ActionResult, ConnectionLost, clone_config


@dataclass
class _FakeJob:
    summary: JobSummary
    history: list[EventEnvelope] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    transitions: list[Transition] = field(default_factory=list)
    worker_log: bytes = b""


# What the fake answers a ResourcesRequest with until a test sets `usage`: a CPU-only machine.
FAKE_HOST = HostUsage(cpu_percent=12.5, cpu_count=2, mem_used_mb=3072.0, mem_total_mb=8192.0)


class FakeConnection:
    """Tests script it (`add_job`, `emit`, `set_state`, `go_down`/`come_back`) and read back the
    actions it was sent (`sent`). Replies to actions come from `replies` (kind -> ActionResult)."""

    def __init__(self, jobs: Iterable[JobSummary] = (), endpoint: str = "fake://daemon") -> None:
        self.endpoint = endpoint
        self._lock = threading.Condition()
        self._jobs: dict[int, _FakeJob] = {}
        self._seq = 0
        self._live: list[EventEnvelope] = []
        self._up = True
        self._connected = False
        self.sent: list[Action] = []
        self.replies: dict[str, ActionResult] = {}
        self.usage = ResourcesReply(t=0.0, host=FAKE_HOST, gpu_note="no GPU: NVML not available (fake)")
        for job in jobs:
            self.add_job(job)

    # -- scripting ------------------------------------------------------------------------------

    def add_job(self, summary: JobSummary, config: dict | None = None) -> None:
        with self._lock:
            self._jobs[summary.id] = _FakeJob(summary, config=dict(config or {}))

    def write_worker_log(self, job: int, text: str) -> None:
        """Append to the job's worker log (its stdout/stderr), as the worker process would."""
        with self._lock:
            self._jobs[job].worker_log += text.encode()

    def emit(self, job: int, *events: AnyEvent, live: bool = True) -> None:
        """Record events for `job` (as the daemon's store would) and publish them when `live`."""
        with self._lock:
            fake = self._jobs[job]
            for event in events:
                if isinstance(event, JobStateEvent):
                    fake.transitions.append(
                        Transition(
                            t=time.time(),
                            from_state=event.prev_state,
                            to_state=event.job.state,
                            reason=event.reason,
                        )  # fmt: skip
                    )
                self._seq += 1
                topic = QUEUE_TOPIC if isinstance(event, JobStateEvent) else job_topic(job)
                env = EventEnvelope(seq=self._seq, topic=topic, job=job, t=time.time(), event=event)
                fake.history.append(env)
                fake.summary = fake.summary.apply(event)
                if live and self._up and self._connected:
                    self._live.append(env)
            self._lock.notify_all()

    def set_state(self, job: int, state: JobState, reason: str = "", live: bool = True) -> None:
        """The job changes state, as the daemon publishes it (the whole new row)."""
        with self._lock:
            row = self._jobs[job].summary
        new = row.model_copy(update={"state": state, "reason": reason})
        self.emit(job, JobStateEvent(job=new, prev_state=row.state, reason=reason), live=live)

    def go_down(self) -> None:
        with self._lock:
            self._up = False
            self._connected = False
            self._live.clear()
            self._lock.notify_all()

    def come_back(self) -> None:
        with self._lock:
            self._up = True

    def job_ids(self) -> list[int]:
        with self._lock:
            return list(self._jobs)

    def summary(self, job: int) -> JobSummary:
        with self._lock:
            return self._jobs[job].summary

    # -- Connection -----------------------------------------------------------------------------

    def _check(self) -> None:
        if not self._up:
            raise ConnectionLost(f"no daemon at {self.endpoint}")

    def connect(self) -> None:
        with self._lock:
            self._check()
            self._connected = True

    def close(self) -> None:
        with self._lock:
            self._connected = False

    def list_jobs(self) -> list[JobSummary]:
        with self._lock:
            self._check()
            return [j.summary for j in self._jobs.values()]

    def job_history(self, job: int, since_seq: int = 0) -> list[EventEnvelope]:
        with self._lock:
            self._check()
            fake = self._jobs.get(job)
            return [e for e in fake.history if e.seq > since_seq] if fake else []

    def poll_events(self, timeout: float) -> list[EventEnvelope]:
        with self._lock:
            self._check()
            if not self._live:
                self._lock.wait(timeout)
            self._check()
            out, self._live = self._live, []
            return out

    def send(self, action: Action) -> ActionResult:
        with self._lock:
            self._check()
            self.sent.append(action)
            if action.kind in self.replies:
                return self.replies[action.kind]
            fake = self._jobs.get(action.job)
            if fake is None:
                return ActionResult(False, f"no such job: {action.job}")
            if action.kind == "clone":
                return self._clone(fake, action)
            if action.kind == "priority":
                fake.summary = fake.summary.model_copy(update={"priority": action.priority or 0})
                return ActionResult(True, f"{action.job}: priority {action.priority}")
            verb = {
                "stop": "stopping",
                "cancel": "cancelling",
                "rollback": "rolling back",
                "checkpoint": "checkpoint requested",
            }[action.kind]
            return ActionResult(True, f"{action.job}: {verb}")

    def _clone(self, fake: _FakeJob, action: Action) -> ActionResult:
        try:
            data = clone_config(fake.config, list(action.overrides), action.job)
        except ConfigError as e:
            return ActionResult(False, str(e))
        new = max(self._jobs) + 1
        row = JobSummary(id=new, name=data["name"], state="queued", priority=fake.summary.priority,
                         total_steps=data["train"]["steps"], created=time.time(), updated=time.time())  # fmt: skip
        self._jobs[new] = _FakeJob(row, config=data)
        self.emit(new, JobStateEvent(job=row, prev_state=None, reason="submitted"))  # an RLock: re-entered
        return ActionResult(True, f"{action.job}: cloned as job {new} ({row.name}); now queued")

    def show(self, job: int) -> JobDetail:
        with self._lock:
            self._check()
            fake = self._jobs[job]
            checkpoints = [
                CheckpointInfo(step=e.event.step, path=e.event.path)
                for e in fake.history
                if isinstance(e.event, CheckpointEvent)
            ]
            metrics = [e.event for e in fake.history if isinstance(e.event, MetricsEvent)]
            return JobDetail(
                summary=fake.summary,
                config=fake.config,
                transitions=list(fake.transitions),
                checkpoints=checkpoints,
                last_metrics=dict(metrics[-1].values) if metrics else {},
            )

    def worker_log(self, job: int, offset: int | None = None) -> WorkerLogReply:
        with self._lock:
            self._check()
            data = self._jobs[job].worker_log
        start = 0 if offset is None or offset > len(data) else offset
        end = data.rindex(b"\n") + 1 if b"\n" in data[start:] else start  # whole lines, as the daemon
        text = data[start:end].decode("utf-8", errors="replace")
        return WorkerLogReply(path=f"fake/{job}/worker.log", text=text, start=start, end=end, size=len(data))

    def resources(self) -> ResourcesReply:
        with self._lock:
            self._check()
            return self.usage
