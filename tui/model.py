"""What the TUI knows about the daemon's jobs: the queue rows and, for jobs whose history was loaded,
every metric point, sample, checkpoint and log line. Pure data, no Textual: easy to test and bench.

Events are applied in sequence order and deduplicated by sequence number, so a snapshot (history since
seq N) and live events can be merged in any interleaving without gaps or duplicates.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from dallm.protocol import (
    CheckpointEvent,
    CheckpointsDeletedEvent,
    EventEnvelope,
    FinishedEvent,
    JobStateEvent,
    JobSummary,
    LogEvent,
    MetricsEvent,
    RolledBackEvent,
    SampleEvent,
    StartedEvent,
    TurningPointEvent,
    format_seconds,
)
from dallm.protocol import eta_seconds as protocol_eta_seconds

LOG_LINES = 2000
_PLACED = frozenset({"cs_fluct", "cs_fluct_step"})  # series placed on a step of their own


class Series:
    """A growing (step, value) series in numpy arrays (amortised O(1) append). Each point also keeps
    the step it was *logged* at: a lagging series (CS-Fluctuation, placed at `cs_fluct_step`) is
    plotted earlier than it was logged, and a rollback erases by the logged step."""

    __slots__ = ("_logged", "_steps", "_values", "n")

    def __init__(self, capacity: int = 256) -> None:
        self._steps = np.empty(capacity, dtype=np.float64)
        self._values = np.empty(capacity, dtype=np.float64)
        self._logged = np.empty(capacity, dtype=np.float64)
        self.n = 0

    def append(self, step: float, value: float, logged: float | None = None) -> None:
        if self.n and step <= self._steps[self.n - 1]:
            # A rollback with resume rewrites history from `step` on: drop the superseded tail.
            self.n = int(np.searchsorted(self._steps[: self.n], step, side="left"))
        if self.n == len(self._steps):
            self._steps = np.resize(self._steps, 2 * self.n)
            self._values = np.resize(self._values, 2 * self.n)
            self._logged = np.resize(self._logged, 2 * self.n)
        self._steps[self.n] = step
        self._values[self.n] = value
        self._logged[self.n] = step if logged is None else logged
        self.n += 1

    def truncate_after(self, step: float) -> Series:
        """Drop the points logged after `step` (what a rollback to `step` erased); returns them."""
        keep = int(np.searchsorted(self._logged[: self.n], step, side="right"))
        tail = Series(max(2, self.n - keep))
        for i in range(keep, self.n):
            tail.append(float(self._steps[i]), float(self._values[i]), float(self._logged[i]))
        self.n = keep
        return tail

    @property
    def steps(self) -> np.ndarray:
        return self._steps[: self.n]

    @property
    def values(self) -> np.ndarray:
        return self._values[: self.n]

    def at(self, step: float) -> float | None:
        """The value recorded exactly at `step`, if any."""
        i = int(np.searchsorted(self.steps, step))
        if i < self.n and self._steps[i] == step:
            return float(self._values[i])
        return None

    def last(self) -> float | None:
        return float(self._values[self.n - 1]) if self.n else None

    def __len__(self) -> int:
        return self.n


@dataclass
class Checkpoint:
    step: int
    path: str


@dataclass
class Sample:
    step: int
    png: bytes
    path: str
    prompts: list[str]  # the grid's rows
    seeds: list[int] = field(default_factory=list)  # the grid's columns
    base: bool = False  # the base model's grid
    texts: list[str] = field(default_factory=list)  # an LLM job's generations (no png)


@dataclass
class JobData:
    """The full history of one job, as far as it was loaded."""

    job: int
    loaded: bool = False
    last_seq: int = 0
    series: dict[str, Series] = field(default_factory=dict)
    superseded: dict[str, Series] = field(default_factory=dict)  # the branch the last rollback left
    samples: list[Sample] = field(default_factory=list)
    base_sample: Sample | None = None  # the base model's grid, kept apart from the history
    checkpoints: list[Checkpoint] = field(default_factory=list)  # the daemon's: on disk, not superseded
    deleted: dict[int, str] = field(default_factory=dict)  # step -> why its checkpoint is gone
    turning_point: int | None = None
    log: deque[tuple[str, str]] = field(default_factory=lambda: deque(maxlen=LOG_LINES))  # (level, text)
    pending: list[EventEnvelope] = field(default_factory=list)  # live events seen before the history
    log_total: int = 0  # lines ever logged (the deque keeps the last LOG_LINES)
    version: int = 0  # bumped on every change: widgets redraw when it moved

    def _log(self, entry: tuple[str, str]) -> None:
        self.log.append(entry)
        self.log_total += 1

    def series_for(self, name: str) -> Series:
        s = self.series.get(name)
        if s is None:
            s = self.series[name] = Series()
        return s

    def value_at(self, name: str, step: int) -> float | None:
        """The value of series `name` at `step`, if one was logged there."""
        s = self.series.get(name)
        return s.at(step) if s is not None else None

    def apply(self, env: EventEnvelope) -> bool:
        """Apply one event; False when it was already applied (seq not newer)."""
        if env.seq <= self.last_seq:
            return False
        self.last_seq = env.seq
        self.version += 1
        ev = env.event
        if env.superseded:
            # From the daemon's history: replaced by a later rollback. Metrics are kept apart.
            if isinstance(ev, MetricsEvent):
                for name, x, value in metric_points(ev):
                    self.superseded.setdefault(name, Series()).append(x, value, ev.step)
            return True
        if isinstance(ev, MetricsEvent):
            for name, x, value in metric_points(ev):
                self.series_for(name).append(x, value, ev.step)
        elif isinstance(ev, SampleEvent):
            sample = Sample(
                ev.step, ev.png, ev.path, list(ev.prompts), list(ev.seeds), ev.base, list(ev.texts)
            )
            if ev.base:
                self.base_sample = sample
            else:
                self.samples = [s for s in self.samples if s.step < ev.step]
                self.samples.append(sample)
        elif isinstance(ev, CheckpointEvent):
            self.checkpoints = [c for c in self.checkpoints if c.step != ev.step]
            self.checkpoints.append(Checkpoint(ev.step, ev.path))
            self.checkpoints.sort(key=lambda c: c.step)
            self.deleted.pop(ev.step, None)
            self._log(("info", f"checkpoint at step {ev.step}"))
        elif isinstance(ev, CheckpointsDeletedEvent):
            gone = set(ev.steps)
            self.checkpoints = [c for c in self.checkpoints if c.step not in gone]
            self.deleted |= dict.fromkeys(gone, ev.reason)
            steps = ", ".join(map(str, sorted(gone)))
            self._log(("info", f"checkpoint(s) at step {steps} deleted ({ev.reason})"))
        elif isinstance(ev, TurningPointEvent):
            self.turning_point = ev.step
            self._log(("info", f"turning point at step {ev.step} (seen at step {ev.seen_at})"))
        elif isinstance(ev, LogEvent):
            self._log((ev.level, ev.message))
        elif isinstance(ev, StartedEvent):
            self._log(
                (
                    "info",
                    f"started at step {ev.start_step}/{ev.total_steps} on {ev.device}, "
                    f"{ev.trainable_params:,} trainable parameters",
                )
            )
        elif isinstance(ev, RolledBackEvent):
            for name, s in self.series.items():
                tail = s.truncate_after(ev.step)
                if len(tail):
                    self.superseded[name] = tail
            self.samples = [s for s in self.samples if s.step <= ev.step]
            self.checkpoints = [c for c in self.checkpoints if c.step <= ev.step]  # superseded
            if self.turning_point is not None and self.turning_point > ev.step:
                self.turning_point = None
            how = "resuming" if ev.resume else "finishing there"
            self._log(("warning", f"rolled back to step {ev.step}, {how}"))
        elif isinstance(ev, FinishedEvent):
            self._log(
                ("info", f"finished ({ev.reason}) at step {ev.final_step}, result = step {ev.result_step}")
            )
        elif isinstance(ev, JobStateEvent):
            state = ev.job.state
            level = "error" if state == "failed" else "info"
            self._log((level, f"state {state}" + (f": {ev.reason}" if ev.reason else "")))
        return True


def metric_points(ev: MetricsEvent) -> list[tuple[str, float, float]]:
    """(series, step, value) of a metrics event. CS-Fluctuation lags the step (its moving-average
    windows): it is placed at `cs_fluct_step`, where the turning point it names is."""
    out = [(name, float(ev.step), v) for name, v in ev.values.items() if name not in _PLACED]
    if "cs_fluct" in ev.values:
        out.append(("cs_fluct", ev.values.get("cs_fluct_step", float(ev.step)), ev.values["cs_fluct"]))
    return out


@dataclass(frozen=True)
class Measure:
    """What a job kind measures on held-out data, as the TUI draws it."""

    series: str  # the prefix of its series: `<series>_val`, `_train`, `_base`, each with `_std`
    title: str  # its chart's title
    short: str  # its name in the checkpoint list
    label: str  # its validation value's name in questions and notes
    log_y: bool  # its chart starts on a log scale


# The kind comes with the job (JobSummary.kind): the TUI does not guess it from the series it sees.
MEASURES = {
    "image": Measure("kid", "KID", "KID", "KID val", log_y=False),
    # perplexity falls by decades (35,000 to 2 on the micro LLM)
    "llm": Measure("ppl", "perplexity", "PPL", "ppl val", log_y=True),
}


@dataclass(frozen=True)
class HistoryView:
    """A loaded job history as the widgets draw it: the data at one version, with what the job's
    kind measures. A value: a new version (or another job) compares unequal, so a widget bound to
    it (Textual's data_bind) redraws when, and only when, there is something new to draw."""

    data: JobData = field(compare=False)  # mutable, grows: `version` says which state this is
    job: int
    version: int
    kind: str = "image"  # JobSummary.kind; "image" until the job's engine has said (StartedEvent)
    live: bool = False  # the job runs: its engine still holds the turning point's weights in memory

    @classmethod
    def of(cls, data: JobData, row: JobSummary | None) -> HistoryView:
        if row is None:
            return cls(data, data.job, data.version)
        live = row.state in ("running", "stopping")
        return cls(data, data.job, data.version, row.kind or "image", live)

    def turning_point_note(self) -> str | None:
        """Why the turning point cannot be rolled back to, and how to keep it; None when it can (a
        checkpoint holds it, or the running engine holds it in memory) or there is none."""
        tp = self.data.turning_point
        if tp is None or self.live or any(c.step == tp for c in self.data.checkpoints):
            return None
        reason = self.data.deleted.get(tp)
        if reason is not None:
            return f"deleted ({reason}) before it was found; a larger checkpoint.keep keeps it"
        return "no checkpoint at its step (checkpoint.every); one every monitor.window steps keeps it"

    @property
    def measure(self) -> Measure:
        return MEASURES.get(self.kind, MEASURES["image"])

    def validation_at(self, step: int) -> tuple[float | None, float | None]:
        """The validation measure (KID, perplexity) at `step` and its spread, where evaluated."""
        name = f"{self.measure.series}_val"
        return self.data.value_at(name, step), self.data.value_at(f"{name}_std", step)


class Model:
    """The queue plus the loaded job histories."""

    def __init__(self) -> None:
        self.jobs: dict[int, JobSummary] = {}
        self.data: dict[int, JobData] = {}

    def set_jobs(self, jobs: list[JobSummary]) -> None:
        self.jobs = {j.id: j for j in jobs}

    def data_for(self, job: int) -> JobData:
        d = self.data.get(job)
        if d is None:
            d = self.data[job] = JobData(job)
        return d

    def apply_history(self, job: int, envelopes: list[EventEnvelope]) -> None:
        """A snapshot (or backfill) of `job`'s history arrived: apply it, then the live events held."""
        d = self.data_for(job)
        for env in envelopes:
            d.apply(env)
        d.loaded = True
        pending, d.pending = d.pending, []
        for env in sorted(pending, key=lambda e: e.seq):
            d.apply(env)
        d.version += 1

    def history(self, job: int | None) -> HistoryView | None:
        """`job`'s history as the widgets draw it, once loaded."""
        data = self.data.get(job) if job is not None else None
        if data is None or not data.loaded:
            return None
        return HistoryView.of(data, self.jobs.get(job))

    def apply_live(self, envelopes: list[EventEnvelope]) -> set[int]:
        """Live events: update the rows; keep the detail of loaded jobs. Returns the jobs touched."""
        touched: set[int] = set()
        for env in envelopes:
            touched.add(env.job)
            row = self.jobs.get(env.job)
            if row is None:  # a job submitted since the last listing: its state event names it
                row = JobSummary(id=env.job, name=str(env.job), state="queued")
            self.jobs[env.job] = row.apply(env.event)
            d = self.data.get(env.job)
            if d is None:
                continue
            if d.loaded:
                d.apply(env)
            else:
                d.pending.append(env)
        return touched


# The ETA (training steps and the evaluations still to come) is shared with `dallm ls`/`show`.
eta_seconds = protocol_eta_seconds
format_eta = format_seconds
