"""Jobs as the daemon keeps and publishes them: states, the summary row and how events change it,
state events, and the envelope every published event travels in.

Topics: "queue" (job state changes, every job) and "job/<id>/" (the engine events of one job).
Every published event has a daemon-wide sequence number `seq` and `prev`, the seq of the previous
event on the same topic, so a subscriber of some topics sees a gap as `prev` > the last seq it has.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, TypeAdapter

from dallm.protocol.events import (
    FinishedEvent,
    JobEventTypes,
    JobKind,
    Message,
    MetricsEvent,
    PhaseEvent,
    ProgressEvent,
    RolledBackEvent,
    StartedEvent,
    TurningPointEvent,
    UsageEvent,
)

QUEUE_TOPIC = "queue"

# stopped: the user stopped it (a stop, a rollback); stopped-early: the monitor did (early stopping)
JobState = Literal[
    "queued", "running", "stopping", "finished", "stopped", "stopped-early", "failed", "cancelled"
]
JOB_STATES: tuple[str, ...] = get_args(JobState)
TERMINAL_STATES = frozenset({"finished", "stopped", "stopped-early", "failed", "cancelled"})


def job_topic(job: int) -> str:
    return f"job/{job}/"


class JobSummary(Message):
    """One job as `ls` shows it."""

    id: int
    name: str
    state: JobState
    priority: int = 0
    step: int = 0  # last step with metrics
    total_steps: int = 0
    device: str = ""
    reason: str = ""  # why the job is in its state (the error of a failed job)
    created: float = 0.0
    updated: float = 0.0
    attempts: int = 0
    out_dir: str = ""
    turning_point: int | None = None
    result_step: int | None = None
    kid_val: float | None = None  # validation KID of the last evaluation kept (or of the result)
    kid_val_std: float | None = None  # its spread, when the engine measured one
    steps_per_s: float | None = None  # training steps alone (evaluation not counted)
    history_gap: str | None = None  # events the daemon lost (its store was unwritable too long)
    phase: str = ""  # what the engine does now (training, sampling, kid, checkpointing, stopping)
    phase_since: float | None = None  # since when (Unix time)
    eval_every: int = 0  # the engine stops to evaluate KID every this many steps (0: never)
    samples_every: int = 0  # ... and to make sample grids
    eval_stop_seconds: float | None = None  # measured mean wall time of one such stop
    peak_rss_mb: float | None = None  # the worker's peak resident memory (UsageEvent)
    peak_gpu_mb: float | None = None  # torch's peak GPU allocation in the worker
    # What the job trains ("image", "llm") and the name of its validation measure ("kid_val",
    # "ppl_val"), as its engine said when it started (StartedEvent); None before that.
    kind: JobKind | None = None
    validation_measure: str | None = None
    # The trainer's step (ProgressEvent): ahead of `step` while the rows wait for background
    # evaluations, `eval_backlog` of them still running; its last loss and learning rate.
    train_step: int | None = None
    eval_backlog: int = 0
    loss: float | None = None
    lr: float | None = None
    stop_step: int | None = None  # the step the engine said it will stop at (early_stop = "auto")
    # The job's validation measure (kid_val or ppl_val) of the last evaluation (or of the result),
    # with its std of the mean; the repeatable validation loss and prompt fidelity on held-out
    # prompts (and the base model's), where the job measures them (dallm.eval.signals).
    validation: float | None = None
    validation_std: float | None = None
    val_loss: float | None = None
    fidelity: float | None = None
    base_fidelity: float | None = None
    selection: str | None = None  # which signal chose the result, by what margin (select = "evidence")

    def apply(self, event: AnyEvent) -> JobSummary:
        """The row after `event`: a state event carries the whole new row; an engine event changes
        the fields `summary_changes` names."""
        if isinstance(event, JobStateEvent):
            return event.job
        changes = summary_changes(event)
        return self.model_copy(update=changes) if changes else self


def summary_changes(event: Any) -> dict[str, Any]:
    """The summary fields an engine event sets (the daemon writes them to its store as they come;
    `JobSummary.apply` folds them into a row). State changes only through `JobStateEvent`."""
    if type(event) is MetricsEvent:  # the bulk: keep this path short
        values = event.values
        out: dict[str, Any] = {"step": event.step}
        if "kid_val" in values:
            out["kid_val"] = values["kid_val"]
            out["kid_val_std"] = values.get("kid_val_std")  # a KID without a spread has none
        for name in ("kid_val", "ppl_val"):
            if name in values:
                out["validation"], out["validation_std"] = values[name], values.get(f"{name}_std")
        for name in ("val_loss", "fidelity", "base_fidelity"):
            if name in values:
                out[name] = values[name]
        if "steps_per_s" in values:
            out["steps_per_s"] = values["steps_per_s"]
        if "eval_stop_seconds" in values:
            out["eval_stop_seconds"] = values["eval_stop_seconds"]
        return out
    if isinstance(event, ProgressEvent):
        values = event.values
        out = {"train_step": event.step, "eval_backlog": event.backlog}
        out |= {k: values[k] for k in ("loss", "lr", "steps_per_s") if k in values}
        return out
    if isinstance(event, UsageEvent):
        return {"peak_rss_mb": event.peak_rss_mb, "peak_gpu_mb": event.peak_gpu_mb}
    if isinstance(event, PhaseEvent):
        return {"phase": event.phase, "phase_since": event.at}
    if isinstance(event, StartedEvent):
        return {
            "step": event.start_step,
            "total_steps": event.total_steps,
            "device": event.device,
            "eval_every": event.eval_every,
            "samples_every": event.samples_every,
            "kind": event.job_kind,
            "validation_measure": event.validation_measure,
            "train_step": event.start_step,
            "eval_backlog": 0,
        }
    if isinstance(event, RolledBackEvent):
        return {"step": event.step, "train_step": event.step, "eval_backlog": 0, "stop_step": None}
    if isinstance(event, TurningPointEvent):
        return {"turning_point": event.step, "stop_step": event.stop_at}
    if isinstance(event, FinishedEvent):
        out = {"result_step": event.result_step, "selection": event.selection}
        if event.result_kid_val is not None:  # the result's KID, not the last evaluated step's
            out["kid_val"] = out["validation"] = event.result_kid_val
            out["kid_val_std"] = out["validation_std"] = event.result_kid_val_std
        return out
    return {}


def _stops(after: int, upto: int, every: int) -> int:
    """How many multiples of `every` lie in (after, upto]."""
    return upto // every - after // every if every > 0 else 0


def trainer_step(row: JobSummary) -> int:
    """The step the trainer is at: the rows' step lags it while background evaluations run."""
    return max(row.step, row.train_step or 0)


def end_step(row: JobSummary) -> int:
    """The step the job will end at: the known stop (early stopping said it) or `total_steps`."""
    if row.stop_step is not None and 0 < row.stop_step < row.total_steps:
        return row.stop_step
    return row.total_steps


def step_text(row: JobSummary) -> str:
    """The trainer's step of the job's steps, with the evaluations it runs ahead of: "249/600
    (eval 3 behind)"."""
    step = trainer_step(row)
    text = f"{step}/{row.total_steps}" if row.total_steps else str(step)
    if row.state in ("running", "stopping") and row.eval_backlog:
        text += f" (eval {row.eval_backlog} behind)"
    return text


def training_line(step: int, total: int, values: dict[str, float], backlog: int = 0) -> str:
    """One line of a trainer's console (the worker log): "step   120/600  loss 0.0312  lr 3.0e-03
    4.12 steps/s  CS 0.912"; the evaluations still running when there are any."""
    width = len(str(total)) if total else 1
    parts = [f"step {step:>{width}}/{total}" if total else f"step {step}"]
    if "loss" in values:
        parts.append(f"loss {values['loss']:.4f}")
    if "lr" in values:
        parts.append(f"lr {values['lr']:.1e}")
    if "steps_per_s" in values:
        parts.append(f"{values['steps_per_s']:.2f} steps/s")
    if "cs" in values:
        parts.append(f"CS {values['cs']:.3f}")
    if backlog:
        parts.append(f"eval {backlog} behind")
    return "  ".join(parts)


def evaluations_left(row: JobSummary) -> int:
    """The evaluation stops still to come: every step where KID or a sample grid is due, plus the
    final evaluation when the last step is not one of them."""
    a, b, step, total = row.eval_every, row.samples_every, trainer_step(row), end_step(row)
    if a <= 0 and b <= 0:
        return 0
    both = math.lcm(a, b) if a > 0 and b > 0 else 0
    n = _stops(step, total, a) + _stops(step, total, b) - _stops(step, total, both)
    last_is_stop = any(k > 0 and total % k == 0 for k in (a, b))
    return n + (0 if last_is_stop or step > total else 1)


def eta_seconds(row: JobSummary) -> float | None:
    """Seconds until a running job ends (at its known stop step, else at total_steps): its training
    steps left at the measured training speed plus its evaluation stops left at their measured
    mean cost (none measured yet: counted as 0, so the ETA grows after the first evaluation
    rather than guessing)."""
    if row.state != "running" or not row.steps_per_s or row.total_steps <= 0:
        return None
    training = max(0, end_step(row) - trainer_step(row)) / row.steps_per_s
    return training + evaluations_left(row) * (row.eval_stop_seconds or 0.0)


def format_seconds(seconds: float | None) -> str:
    """A duration as people read it: 42s, 3m07s, 1h05m; "-" when unknown."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def kid_text(kid: float | None, std: float | None = None) -> str:
    """A KID with its spread when known: a KID well inside its std is no evidence of anything."""
    if kid is None:
        return "-"
    return f"{kid:.4f}" if std is None else f"{kid:.4f}±{std:.2g}"


def phase_text(row: JobSummary, now: float) -> str:
    """What a live job does now and for how long ("kid 1m05s"); "" for a job not running."""
    if row.state not in ("running", "stopping") or not row.phase:
        return ""
    if row.phase_since is None:
        return row.phase
    return f"{row.phase} {format_seconds(max(0.0, now - row.phase_since))}"


def peak_memory_text(s: JobSummary) -> str:
    """The worker's peak memory (of its latest attempt): resident, and on a GPU torch's peak."""
    text = f"{s.peak_rss_mb:,.0f} MiB resident" if s.peak_rss_mb is not None else "not reported"
    if s.peak_gpu_mb is not None:
        text += f", {s.peak_gpu_mb:,.0f} MiB GPU (torch peak allocation)"
    return text


class Transition(Message):
    t: float
    from_state: JobState | None
    to_state: JobState
    reason: str


class CheckpointInfo(Message):
    step: int
    path: str
    superseded: bool = False


class JobDetail(Message):
    summary: JobSummary
    config: dict
    transitions: list[Transition]
    checkpoints: list[CheckpointInfo]
    last_metrics: dict[str, float] = Field(default_factory=dict)


class JobStateEvent(Message):
    """A job changed state (or priority); published on the queue topic with the job's new row."""

    kind: Literal["state"] = "state"
    job: JobSummary
    prev_state: JobState | None = None
    reason: str = ""


AnyEvent = Annotated[JobEventTypes | JobStateEvent, Field(discriminator="kind")]
any_event_adapter: TypeAdapter[AnyEvent] = TypeAdapter(AnyEvent)


class EventEnvelope(Message):
    """An event as the daemon stored and published it. `t`: when it was emitted (Unix time)."""

    seq: int
    prev: int = 0
    topic: str
    job: int
    t: float
    superseded: bool = False  # history only: a later rollback/resume replaced this part of the run
    event: AnyEvent
