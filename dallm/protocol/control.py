"""Control requests a client sends the daemon (ROUTER socket) and the replies it gets.

Framing (every frame is UTF-8 JSON unless noted; binary thumbnails travel as extra frames), see
`dallm.protocol.wire`:
  control request   [json {"v": PROTOCOL_VERSION, "id": int, "req": Request}]
  control reply     [json {"v": PROTOCOL_VERSION, "id": int, "rep": Reply}, blob0, blob1, ...]
  published event   [topic, json EventEnvelope (png left out, "blob": 0 when frame 2 holds it), png?]
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from dallm.protocol.events import Message as _Message
from dallm.protocol.jobs import EventEnvelope, JobDetail, JobState, JobSummary
from dallm.protocol.resources import GpuUsage, HostUsage, JobUsage

PROTOCOL_VERSION = 1
MAX_CONTROL_BYTES = 1 << 20  # ZMQ_MAXMSGSIZE of the control socket: a bigger frame drops the peer
MAX_WORKER_LOG_BYTES = 256 << 10  # one worker-log answer: well inside a control frame

# preflight_failed: a submit whose config is valid but could not run (no images, a corrupt image, a
# missing caption, model.base not found, a rank wider than the model...); the message names the key
# or file. invalid_config: the config itself is malformed.
ErrorCode = Literal[
    "bad_request", "bad_version", "bad_reply", "bad_event", "invalid_config", "preflight_failed",
    "not_found", "conflict", "internal", "unavailable",
    "unauthorized",  # a CURVE key removed from authorized/ while its connection was open
    "unsafe",  # the client refused a socket folder someone else owns or could write in
]  # fmt: skip

# A job id (ASCII digits) or name: the JobConfig.name pattern; "١" (an Arabic-Indic one) is neither.
JobRef = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class ProtocolError(ValueError):
    """A request the daemon refuses, or a frame that is not a valid message of this protocol
    version: `code` is machine-readable (an ErrorCode), the message one line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


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


class WorkerLogRequest(_Message):
    """Bytes of the job's worker log (the worker's stdout/stderr: prints, warnings, tracebacks).
    `offset` None: the last `max_bytes` (a tail); else from `offset` on (following a tail)."""

    op: Literal["worker_log"] = "worker_log"
    job: JobRef
    offset: int | None = Field(default=None, ge=0)
    max_bytes: int = Field(default=MAX_WORKER_LOG_BYTES, ge=1, le=MAX_WORKER_LOG_BYTES)


class ResourcesRequest(_Message):
    """Host CPU/memory, each GPU and each running job's worker, sampled by the daemon now."""

    op: Literal["resources"] = "resources"


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
    | WorkerLogRequest
    | ResourcesRequest
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


class WorkerLogReply(_Message):
    """`text`: bytes `start`..`end` of the log (decoded as UTF-8, broken characters replaced);
    `size`: the file's length now. A missing log (the job never started) is empty, size 0."""

    op: Literal["worker_log"] = "worker_log"
    path: str
    text: str
    start: int
    end: int
    size: int


class ResourcesReply(_Message):
    op: Literal["resources"] = "resources"
    t: float  # when sampled (Unix time)
    host: HostUsage
    gpus: list[GpuUsage] = Field(default_factory=list)
    gpu_note: str = ""  # why no GPU is listed (no NVML on the daemon's machine, say)
    jobs: list[JobUsage] = Field(default_factory=list)


class OkReply(_Message):
    op: Literal["ok"] = "ok"
    message: str = ""


class ErrorReply(_Message):
    op: Literal["error"] = "error"
    code: str  # an ErrorCode (a plain str: a client reads codes a newer daemon adds)
    message: str


Reply = Annotated[
    PongReply
    | JobReply
    | JobListReply
    | JobDetailReply
    | HistoryReply
    | LogsReply
    | WorkerLogReply
    | ResourcesReply
    | OkReply
    | ErrorReply,
    Field(discriminator="op"),
]
reply_adapter: TypeAdapter[Reply] = TypeAdapter(Reply)
