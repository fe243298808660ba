"""Messages between processes, defined once: every process (engine, worker, daemon, CLI, TUI) imports
this module. Events flow up from a training job; commands flow down to it.

The daemon section (requests, replies, framing, protocol version) is added by the daemon work.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# Events emitted by a training job (the engine calls `emit(event)`; a worker forwards them).


class MetricsEvent(_Message):
    """Scalars at one step: loss, lr, grad_norm, steps_per_s, cs, cs_fluct, kid_val, ..."""

    kind: Literal["metrics"] = "metrics"
    step: int
    values: dict[str, float]


class SampleEvent(_Message):
    """A sample grid made at `step` (fixed prompts x fixed seeds); `png` is a small thumbnail grid."""

    kind: Literal["sample"] = "sample"
    step: int
    path: str  # full-size grid on disk, relative to the job's output folder
    png: bytes = b""
    prompts: list[str] = Field(default_factory=list)


class CheckpointEvent(_Message):
    kind: Literal["checkpoint"] = "checkpoint"
    step: int
    path: str  # relative to the job's output folder


class TurningPointEvent(_Message):
    """The CS-Fluctuation detector found the turning point (second valley) at `step`, seen at `seen_at`."""

    kind: Literal["turning_point"] = "turning_point"
    step: int
    seen_at: int


class LogEvent(_Message):
    kind: Literal["log"] = "log"
    level: Literal["debug", "info", "warning", "error"] = "info"
    message: str


class StartedEvent(_Message):
    """The engine is ready and about to run steps `start_step + 1 .. total_steps`."""

    kind: Literal["started"] = "started"
    start_step: int
    total_steps: int
    device: str
    trainable_params: int


class RolledBackEvent(_Message):
    """Weights and optimizer state are now those of `step`; history after it is superseded."""

    kind: Literal["rolled_back"] = "rolled_back"
    step: int
    resume: bool


class FinishedEvent(_Message):
    """The engine is done: `result_step` is the step whose weights were written as the result."""

    kind: Literal["finished"] = "finished"
    reason: Literal["completed", "early_stop", "stopped", "rolled_back", "interrupted"]
    final_step: int
    result_step: int
    result_kid_val: float | None = None  # validation KID of the result weights, when measured


JobEvent = Annotated[
    MetricsEvent
    | SampleEvent
    | CheckpointEvent
    | TurningPointEvent
    | LogEvent
    | StartedEvent
    | RolledBackEvent
    | FinishedEvent,
    Field(discriminator="kind"),
]
job_event_adapter: TypeAdapter[JobEvent] = TypeAdapter(JobEvent)


# ---------------------------------------------------------------------------------------------
# Commands a running job obeys between steps (the engine calls `poll()` once per step).


class StopCommand(_Message):
    """Finish now: with the turning-point weights when one was found, else the current ones."""

    kind: Literal["stop"] = "stop"


class RollbackCommand(_Message):
    """Restore the exact weights and optimizer state of `step`; finish there, or continue from it."""

    kind: Literal["rollback"] = "rollback"
    step: int
    resume: bool = False


class CheckpointNowCommand(_Message):
    kind: Literal["checkpoint_now"] = "checkpoint_now"


class InterruptCommand(_Message):
    """Write a checkpoint and exit so that the job can resume later (Ctrl-C, daemon shutdown)."""

    kind: Literal["interrupt"] = "interrupt"


JobCommand = Annotated[
    StopCommand | RollbackCommand | CheckpointNowCommand | InterruptCommand, Field(discriminator="kind")
]
job_command_adapter: TypeAdapter[JobCommand] = TypeAdapter(JobCommand)


# =============================================================================================
# Daemon protocol: control requests/replies (ROUTER), event envelopes (PUB), worker messages.
#
# Framing (every frame is UTF-8 JSON unless noted; binary thumbnails travel as extra frames):
#   control request   [json {"v": PROTOCOL_VERSION, "id": int, "req": Request}]
#   control reply     [json {"v": PROTOCOL_VERSION, "id": int, "rep": Reply}, blob0, blob1, ...]
#   published event   [topic, json EventEnvelope (png left out, "blob": 0 when frame 2 holds it), png?]
#   worker -> daemon  [b"hello"|b"done"|b"error", json] or [b"ev", b"<unix time>", json JobEvent, png?]
#   daemon -> worker  [json JobCommand]
# Topics: "queue" (job state changes, every job) and "job/<id>/" (the engine events of one job).
# Every published event has a daemon-wide sequence number `seq` and `prev`, the seq of the previous
# event on the same topic, so a subscriber of some topics sees a gap as `prev` > the last seq it has.

PROTOCOL_VERSION = 1
MAX_CONTROL_BYTES = 1 << 20  # ZMQ_MAXMSGSIZE of the control socket: a bigger frame drops the peer
MAX_WORKER_BYTES = 64 << 20
QUEUE_TOPIC = "queue"

JobState = Literal["queued", "running", "stopping", "finished", "stopped-early", "failed", "cancelled"]
JOB_STATES: tuple[str, ...] = get_args(JobState)
TERMINAL_STATES = frozenset({"finished", "stopped-early", "failed", "cancelled"})


# A job id (ASCII digits) or name: the JobConfig.name pattern; "١" (an Arabic-Indic one) is neither.
JobRef = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


def job_topic(job: int) -> str:
    return f"job/{job}/"


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version; `code` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class JobSummary(_Message):
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
    kid_val: float | None = None
    steps_per_s: float | None = None


class Transition(_Message):
    t: float
    from_state: JobState | None
    to_state: JobState
    reason: str


class CheckpointInfo(_Message):
    step: int
    path: str
    superseded: bool = False


class JobDetail(_Message):
    summary: JobSummary
    config: dict
    transitions: list[Transition]
    checkpoints: list[CheckpointInfo]
    last_metrics: dict[str, float] = Field(default_factory=dict)


class JobStateEvent(_Message):
    """A job changed state (or priority); published on the queue topic with the job's new row."""

    kind: Literal["state"] = "state"
    job: JobSummary
    prev_state: JobState | None = None
    reason: str = ""


AnyEvent = Annotated[
    MetricsEvent
    | SampleEvent
    | CheckpointEvent
    | TurningPointEvent
    | LogEvent
    | StartedEvent
    | RolledBackEvent
    | FinishedEvent
    | JobStateEvent,
    Field(discriminator="kind"),
]
any_event_adapter: TypeAdapter[AnyEvent] = TypeAdapter(AnyEvent)


class EventEnvelope(_Message):
    """An event as the daemon stored and published it. `t`: when it was emitted (Unix time)."""

    seq: int
    prev: int = 0
    topic: str
    job: int
    t: float
    superseded: bool = False  # history only: a later rollback/resume replaced this part of the run
    event: AnyEvent


# --- requests --------------------------------------------------------------------------------


class PingRequest(_Message):
    op: Literal["ping"] = "ping"


class SubmitRequest(_Message):
    op: Literal["submit"] = "submit"
    config: dict  # a JobConfig as config_to_dict gives it; the daemon validates it again
    priority: int = 0
    retries: int = Field(default=0, ge=0)  # times a crashed worker is restarted from the last checkpoint
    source: str = "config"  # the config's file name, for error messages
    # The config file's folder (absolute): jobs submitted over IPC may use paths under it.
    config_dir: str | None = None


class ListRequest(_Message):
    op: Literal["list"] = "list"
    states: list[JobState] | None = None
    limit: int | None = Field(default=None, ge=1)


class ShowRequest(_Message):
    op: Literal["show"] = "show"
    job: JobRef  # id, or the name of the newest job with that name


class HistoryRequest(_Message):
    """Stored events with seq > `since` on `topics` (None: all), oldest first, at most `limit`."""

    op: Literal["history"] = "history"
    since: int = Field(default=0, ge=0)
    topics: list[str] | None = None
    limit: int = Field(default=5000, ge=1, le=50000)
    kinds: list[str] | None = None
    include_png: bool = True


class LogsRequest(_Message):
    op: Literal["logs"] = "logs"
    job: JobRef
    since: int = Field(default=0, ge=0)


class StopRequest(_Message):
    op: Literal["stop"] = "stop"
    job: JobRef


class RollbackRequest(_Message):
    op: Literal["rollback"] = "rollback"
    job: JobRef
    step: int = Field(ge=0)
    resume: bool = False


class CancelRequest(_Message):
    op: Literal["cancel"] = "cancel"
    job: JobRef


class CheckpointRequest(_Message):
    """Ask a running job to write a checkpoint now (CheckpointNowCommand)."""

    op: Literal["checkpoint"] = "checkpoint"
    job: JobRef


class PriorityRequest(_Message):
    op: Literal["priority"] = "priority"
    job: JobRef
    priority: int


class ShutdownRequest(_Message):
    """Graceful: running jobs checkpoint and are resumed when a daemon starts again."""

    op: Literal["shutdown"] = "shutdown"


Request = Annotated[
    PingRequest
    | SubmitRequest
    | ListRequest
    | ShowRequest
    | HistoryRequest
    | LogsRequest
    | StopRequest
    | RollbackRequest
    | CancelRequest
    | CheckpointRequest
    | PriorityRequest
    | ShutdownRequest,
    Field(discriminator="op"),
]
request_adapter: TypeAdapter[Request] = TypeAdapter(Request)


# --- replies ---------------------------------------------------------------------------------


class PongReply(_Message):
    op: Literal["pong"] = "pong"
    version: int = PROTOCOL_VERSION
    pid: int
    home: str
    started: float
    head: int  # the last sequence number published
    slots: list[str]
    events: list[str]  # endpoints of the event (PUB) sockets
    counts: dict[str, int] = Field(default_factory=dict)  # jobs per state


class JobReply(_Message):
    op: Literal["job"] = "job"
    job: JobSummary
    message: str = ""


class JobListReply(_Message):
    op: Literal["jobs"] = "jobs"
    jobs: list[JobSummary]


class JobDetailReply(_Message):
    op: Literal["detail"] = "detail"
    detail: JobDetail


class HistoryReply(_Message):
    op: Literal["history"] = "history"
    events: list[EventEnvelope]
    head: int  # the last seq published when the history was read
    more: bool = False  # `limit` cut the answer: ask again with since = events[-1].seq


class LogLine(_Message):
    seq: int
    t: float
    level: str
    message: str


class LogsReply(_Message):
    op: Literal["logs"] = "logs"
    lines: list[LogLine]
    head: int


class OkReply(_Message):
    op: Literal["ok"] = "ok"
    message: str = ""


class ErrorReply(_Message):
    op: Literal["error"] = "error"
    code: str  # bad_request | bad_version | invalid_config | not_found | conflict | internal
    message: str


Reply = Annotated[
    PongReply | JobReply | JobListReply | JobDetailReply | HistoryReply | LogsReply | OkReply | ErrorReply,
    Field(discriminator="op"),
]
reply_adapter: TypeAdapter[Reply] = TypeAdapter(Reply)


# --- worker messages -------------------------------------------------------------------------


class WorkerHello(_Message):
    job: int
    attempt: int
    pid: int


class WorkerDone(_Message):
    """The engine returned (TrainResult)."""

    out_dir: str
    final_step: int
    result_step: int
    reason: str
    turning_point: int | None = None


class WorkerError(_Message):
    """The engine raised: `category` is oom, nan, disk_full or error; `message` is one line."""

    category: Literal["oom", "nan", "disk_full", "error"]
    message: str
    traceback: str = ""


# --- framing ---------------------------------------------------------------------------------

import json as _json  # noqa: E402


def encode_request(req_id: int, req: _Message) -> bytes:
    body = req.model_dump_json()
    return f'{{"v":{PROTOCOL_VERSION},"id":{int(req_id)},"req":{body}}}'.encode()


def _open_frame(frame: bytes, key: str) -> tuple[int, dict]:
    from dallm.wire_limits import FrameShapeError, loads_bounded

    try:
        data = loads_bounded(frame)
    except FrameShapeError as e:
        raise ProtocolError("bad_request", str(e)) from None
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("bad_request", "frame is not JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_request", "frame is not a JSON object")
    version = data.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # 1.0 and true are not 1
        raise ProtocolError(
            "bad_version", f"protocol version {data.get('v')!r}; this side speaks {PROTOCOL_VERSION}"
        )
    req_id = data.get("id")
    if not isinstance(req_id, int) or isinstance(req_id, bool):
        raise ProtocolError("bad_request", "missing or non-integer id")
    body = data.get(key)
    if not isinstance(body, dict):
        raise ProtocolError("bad_request", f"missing {key!r} object")
    return req_id, body


def decode_request(frame: bytes) -> tuple[int, Request]:
    """(id, request) or ProtocolError. The id is 0 when the frame is too broken to carry one."""
    req_id, body = _open_frame(frame, "req")
    try:
        return req_id, request_adapter.validate_python(body)
    except ValueError as e:  # pydantic.ValidationError is a ValueError
        first = str(e).splitlines()
        raise ProtocolError("bad_request", " ".join(first[:3])[:300]) from None


def _envelope_dict(env: EventEnvelope) -> tuple[dict, bytes | None]:
    blob = env.event.png if isinstance(env.event, SampleEvent) and env.event.png else None
    data = (
        env.model_dump(mode="json", exclude={"event": {"png"}})
        if blob is not None
        else env.model_dump(mode="json")
    )
    return data, blob


def encode_reply(req_id: int, rep: _Message) -> list[bytes]:
    """Reply frames; thumbnails in a history reply ride as extra binary frames (no base64)."""
    blobs: list[bytes] = []
    if isinstance(rep, HistoryReply):
        events = []
        for env in rep.events:
            data, blob = _envelope_dict(env)
            if blob is not None:
                data["blob"] = len(blobs)
                blobs.append(blob)
            events.append(data)
        body = _json.dumps({"op": "history", "events": events, "head": rep.head, "more": rep.more})
    else:
        body = rep.model_dump_json()
    head = f'{{"v":{PROTOCOL_VERSION},"id":{int(req_id)},"rep":{body}}}'.encode()
    return [head, *blobs]


def _attach(data: dict, blobs: list[bytes]) -> dict:
    idx = data.pop("blob", None)
    if idx is not None and 0 <= idx < len(blobs):
        data["event"]["png"] = blobs[idx]
    return data


def decode_reply(frames: list[bytes]) -> tuple[int, Reply]:
    req_id, body = _open_frame(frames[0], "rep")
    if body.get("op") == "history" and isinstance(body.get("events"), list):
        body["events"] = [_attach(e, frames[1:]) for e in body["events"]]
    try:
        return req_id, reply_adapter.validate_python(body)
    except ValueError as e:
        raise ProtocolError("bad_reply", str(e).splitlines()[0]) from None


def encode_envelope(env: EventEnvelope) -> list[bytes]:
    data, blob = _envelope_dict(env)
    if blob is not None:
        data["blob"] = 0
        return [env.topic.encode(), _json.dumps(data).encode(), blob]
    return [env.topic.encode(), _json.dumps(data).encode()]


def envelope_frames(
    seq: int, prev: int, topic: str, job: int, t: float, event_json: str, blob: bytes | None
) -> list[bytes]:
    """The daemon's fast path: an envelope from an event's JSON text as stored (no re-validation)."""
    tail = ',"blob":0}' if blob else "}"
    head = f'{{"seq":{seq},"prev":{prev},"topic":"{topic}","job":{job},"t":{t!r},"event":{event_json}{tail}'
    return [topic.encode(), head.encode(), blob] if blob else [topic.encode(), head.encode()]


def decode_envelope(frames: list[bytes]) -> EventEnvelope:
    if len(frames) < 2:
        raise ProtocolError("bad_event", "an event has at least two frames")
    try:
        data = _json.loads(frames[1])
        return EventEnvelope.model_validate(_attach(data, frames[2:]))
    except (ValueError, TypeError, KeyError) as e:
        raise ProtocolError("bad_event", str(e).splitlines()[0]) from None


def history_frames(
    req_id: int, rows: list[tuple[int, int, int, str, int, float, str, bytes | None]], head: int, more: bool
) -> list[bytes]:
    """The daemon's fast path for a HistoryReply from stored rows (seq, prev, job, topic, superseded,
    t, event JSON, png): no re-validation of events that were validated when they came in."""
    blobs: list[bytes] = []
    items = []
    for seq, prev, job, topic, superseded, t, data, blob in rows:
        tail = "}"
        if blob:
            tail = f',"blob":{len(blobs)}}}'
            blobs.append(blob)
        sup = "true" if superseded else "false"
        items.append(
            f'{{"seq":{seq},"prev":{prev},"topic":"{topic}","job":{job},"t":{t!r},"superseded":{sup},"event":{data}{tail}'
        )
    body = (
        f'{{"op":"history","events":[{",".join(items)}],"head":{head},"more":{"true" if more else "false"}}}'
    )
    return [f'{{"v":{PROTOCOL_VERSION},"id":{int(req_id)},"rep":{body}}}'.encode(), *blobs]
