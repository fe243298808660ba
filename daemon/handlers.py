"""Control requests: one function per request type, each returning its reply, and `handle`, the one
dispatch over the request types (a `match`, as pueue's message handler), which encodes it. Handlers
see the daemon through `Context` only.

Errors a client can act on are `ProtocolError(code, message)`, sent back as ErrorReply: one line each.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import assert_never

from dallm.client.home import DaemonPaths
from dallm.config import ConfigError, config_from_dict
from dallm.daemon.confine import Roots, check_reads, output_folder
from dallm.daemon.events import EventLog
from dallm.daemon.jobs import JobService
from dallm.daemon.jobstate import CancelPending, encode_pending
from dallm.daemon.limits import MAX_HISTORY_PAGE, page_rows
from dallm.daemon.resources import ResourceSampler, RunningWorker
from dallm.daemon.scheduler import Scheduler, WorkerProc
from dallm.daemon.store import Store
from dallm.jobfiles import UnsafeJobFolder, read_fd
from dallm.preflight import PreflightError, check_hub, preflight
from dallm.protocol import (
    TERMINAL_STATES,
    CancelRequest,
    CheckpointNowCommand,
    CheckpointRequest,
    ErrorReply,
    HistoryRequest,
    JobCommand,
    JobDetail,
    JobDetailReply,
    JobListReply,
    JobReply,
    ListRequest,
    LogLine,
    LogsReply,
    LogsRequest,
    OkReply,
    PingRequest,
    PongReply,
    PriorityRequest,
    ProtocolError,
    Reply,
    Request,
    ResourcesReply,
    ResourcesRequest,
    RollbackCommand,
    RollbackRequest,
    ShowRequest,
    ShutdownRequest,
    StopCommand,
    StopRequest,
    SubmitRequest,
    WorkerLogReply,
    WorkerLogRequest,
    encode_reply,
    history_frames,
)


@dataclass(frozen=True)
class Context:
    """What the handlers use, and nothing else: the store to read, the job service for every change
    of a job's row, the event log (its head, a job's log lines), the running workers and the
    daemon's own facts for a ping."""

    store: Store
    jobs: JobService
    events: EventLog
    sched: Scheduler  # the running workers (by_job), a free slot, kill
    command: Callable[[WorkerProc, JobCommand], None]  # to a worker (held until its hello)
    schedule: Callable[[], None]  # start what the queue and free slots allow now
    shutting_down: Callable[[], bool]
    begin_shutdown: Callable[[], None]
    resources: ResourceSampler
    roots: Roots
    paths: DaemonPaths
    started: float
    slots: list[str]
    event_endpoints: list[str]


def _job(ctx: Context, ref: str) -> dict:
    row = ctx.store.find_job(ref)
    if row is None:
        raise ProtocolError("not_found", f"no job {ref!r}")
    return row


def submit(ctx: Context, req: SubmitRequest, local: bool = False) -> JobReply:
    """Queue a job whose outputs and inputs lie under the daemon's roots (daemon/confine.py)."""
    if ctx.shutting_down():
        raise ProtocolError("conflict", "the daemon is shutting down")
    cfg = config_from_dict(json.loads(json.dumps(req.config)), req.source)
    roots = ctx.roots.for_request(local, req.config_dir)
    check_reads(cfg, req.source, roots)  # before the preflight looks at anything: no existence leak
    try:  # the same preflight as `dallm submit`, as the daemon's machine sees the files
        preflight(cfg)
        check_hub(cfg.model.base)  # a hub id it cannot fetch fails now, with the cause, not 30 s later
    except PreflightError as e:
        raise ProtocolError("preflight_failed", f"{req.source}: {e}") from None
    data = cfg.model_dump(mode="json")
    out_spec = data.get("output_dir")

    def folder(job: int) -> Path:
        return output_folder(ctx.paths.jobs, job, cfg.name, out_spec, roots, req.source)

    folder(0)  # refuse before anything is queued
    job = ctx.jobs.submit(cfg.name, data, req.priority, cfg.train.steps, req.retries, folder)
    ctx.schedule()
    return JobReply(job=ctx.store.summary(job), message=f"job {job} queued")


def show(ctx: Context, req: ShowRequest) -> JobDetailReply:
    row = _job(ctx, req.job)
    job = row["id"]
    out = Path(row["out_dir"] or ".")
    checkpoints = [c for c in ctx.store.checkpoints(job) if c.superseded or (out / c.path).exists()]
    detail = JobDetail(
        summary=ctx.store.summary(job),
        config=json.loads(row["config"]),
        transitions=ctx.store.transitions(job),
        checkpoints=checkpoints,
        last_metrics=ctx.store.last_metrics(job),
    )
    return JobDetailReply(detail=detail)


def stop(ctx: Context, req: StopRequest) -> JobReply:
    row = _job(ctx, req.job)
    job, state = row["id"], row["state"]
    w = ctx.sched.by_job.get(job)
    if state == "queued":
        raise ProtocolError("conflict", f"job {job} is queued, not running; `dallm cancel {job}` discards it")
    if w is None or state != "running":
        raise ProtocolError("conflict", f"job {job} is {state}")
    ctx.command(w, StopCommand())
    # `pending` survives a daemon crash: the resumed job is told again (see Reconciler.recover).
    ctx.jobs.set_state(job, "stopping", "stop requested: finish now (turning point weights when found)",
                pending=encode_pending(StopCommand()))  # fmt: skip
    return JobReply(job=ctx.store.summary(job), message=f"job {job} stopping")


def rollback(ctx: Context, req: RollbackRequest) -> JobReply:
    row = _job(ctx, req.job)
    job, state = row["id"], row["state"]
    how = "and resume" if req.resume else "and finish there"
    w = ctx.sched.by_job.get(job)
    if state in ("running", "stopping") and w is not None:
        if req.step > max(w.last_step, row["step"]):
            raise ProtocolError(
                "conflict",
                f"job {job} is at step {max(w.last_step, row['step'])}; cannot roll back to {req.step}",
            )
        ctx.command(w, RollbackCommand(step=req.step, resume=req.resume))
        if req.resume:
            ctx.events.job_log(job, "info", f"rollback to step {req.step} requested (resume)")
            ctx.events.flush()
        else:
            cmd = encode_pending(RollbackCommand(step=req.step, resume=False))
            ctx.jobs.set_state(job, "stopping", f"rollback to step {req.step} {how} requested", pending=cmd)
        return JobReply(job=ctx.store.summary(job), message=f"job {job}: rolling back to step {req.step}")
    if state == "queued":
        raise ProtocolError("conflict", f"job {job} is queued; nothing to roll back")
    out = Path(row["out_dir"])
    kept = {c.step: out / c.path for c in ctx.store.checkpoints(job) if (out / c.path).is_dir()}
    ckpt = kept.get(req.step)
    if ckpt is None:
        have = ", ".join(map(str, sorted(kept))) or "none"
        raise ProtocolError("not_found", f"job {job} has no checkpoint at step {req.step} (have: {have})")
    pending = None if req.resume else encode_pending(RollbackCommand(step=req.step, resume=False))
    why = f"rollback to step {req.step} {how}"
    if ctx.sched.free_slot() is None:  # writing the result loads the model: it takes a slot too
        busy = ", ".join(map(str, sorted(ctx.sched.by_job))) or "none"
        why += f"; waits for a free slot (running: job {busy})"
    ctx.jobs.set_state(
        job,
        "queued",
        why,
        resume_path=str(ckpt),
        pending=pending,
        ended=None,
    )
    ctx.schedule()
    return JobReply(job=ctx.store.summary(job), message=f"job {job}: rolling back to step {req.step}")


def cancel(ctx: Context, req: CancelRequest) -> JobReply:
    row = _job(ctx, req.job)
    job, state = row["id"], row["state"]
    if state in TERMINAL_STATES:
        raise ProtocolError("conflict", f"job {job} is already {state}")
    w = ctx.sched.by_job.get(job)
    if w is not None:
        w.cancel = True
        ctx.sched.kill(w)
        ctx.jobs.set_state(job, "stopping", "cancel requested", pending=encode_pending(CancelPending()))
    else:
        ctx.jobs.set_state(
            job, "cancelled", "cancelled by user (never ran)" if not row["attempts"] else "cancelled by user"
        )
    return JobReply(job=ctx.store.summary(job), message=f"job {job} cancelled")


def checkpoint(ctx: Context, req: CheckpointRequest) -> JobReply:
    row = _job(ctx, req.job)
    w = ctx.sched.by_job.get(row["id"])
    if w is None or row["state"] != "running":
        raise ProtocolError("conflict", f"job {row['id']} is {row['state']}, not running")
    ctx.command(w, CheckpointNowCommand())
    return JobReply(job=ctx.store.summary(row["id"]), message=f"job {row['id']}: checkpoint requested")


def priority(ctx: Context, req: PriorityRequest) -> JobReply:
    row = _job(ctx, req.job)
    job = row["id"]
    ctx.jobs.set_priority(job, req.priority)
    return JobReply(job=ctx.store.summary(job), message=f"job {job}: priority {req.priority}")


def logs(ctx: Context, req: LogsRequest) -> LogsReply:
    job = _job(ctx, req.job)["id"]
    lines = []
    for seq, t, kind, data in ctx.store.log_events(job, req.since):
        ev = json.loads(data)
        if kind == "log":
            lines.append(LogLine(seq=seq, t=t, level=ev["level"], message=ev["message"]))
        else:
            lines.append(
                LogLine(seq=seq, t=t, level="state", message=f"{ev['job']['state']}: {ev['reason']}")
            )
    return LogsReply(lines=lines, head=ctx.events.head)


WORKER_LOG = "worker.log"  # in the job's output folder (JobLifecycle.start_job: stdout and stderr)


def worker_log(ctx: Context, req: WorkerLogRequest) -> WorkerLogReply:
    """A tail of the worker's log, or what was added since `offset`: whole lines only, so that a
    follower never splits one (a single line longer than `max_bytes` comes cut)."""
    row = _job(ctx, req.job)
    path = Path(row["out_dir"] or ".") / WORKER_LOG
    try:
        with os.fdopen(read_fd(path.parent, WORKER_LOG), "rb") as f:  # a planted link is refused
            size = os.fstat(f.fileno()).st_size
            if req.offset is None:
                start = max(0, size - req.max_bytes)
            else:
                start = req.offset if req.offset <= size else 0  # shorter than before: a new file
            f.seek(start)
            data = f.read(min(req.max_bytes, size - start))
    except FileNotFoundError:
        return WorkerLogReply(path=str(path), text="", start=0, end=0, size=0)
    except (OSError, UnsafeJobFolder) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ProtocolError("conflict", f"job {row['id']}: cannot read {path}: {why}") from None
    if req.offset is None and start > 0 and b"\n" in data:
        cut = data.index(b"\n") + 1  # a tail starts at a line's start
        data, start = data[cut:], start + cut
    if not data.endswith(b"\n") and b"\n" in data:
        data = data[: data.rindex(b"\n") + 1]  # the last line is still being written
    elif not data.endswith(b"\n") and len(data) < req.max_bytes:
        data = b""  # one unfinished line: wait for its end
    text = data.decode("utf-8", errors="replace")
    return WorkerLogReply(path=str(path), text=text, start=start, end=start + len(data), size=size)


def resources(ctx: Context) -> ResourcesReply:
    # A worker on another machine (an executor's node: pid None) is not sampled here.
    workers = [
        RunningWorker(job, w.proc.pid, w.device)
        for job, w in sorted(ctx.sched.by_job.items())
        if w.proc.pid is not None
    ]
    return ctx.resources.sample(workers)


def history(ctx: Context, req_id: int, req: HistoryRequest) -> list[bytes]:
    """Frames of its own: the events travel as blobs beside the reply."""
    limit = min(req.limit, MAX_HISTORY_PAGE)
    rows = ctx.store.history(req.since, req.topics, limit, req.kinds)
    if not req.include_png:
        rows = [(*r[:7], None) for r in rows]
    rows, more = page_rows(rows, limit)
    return history_frames(req_id, rows, ctx.events.head, more)


def ping(ctx: Context) -> PongReply:
    return PongReply(pid=os.getpid(), home=str(ctx.paths.home), started=ctx.started, head=ctx.events.head,
                     slots=ctx.slots, events=ctx.event_endpoints, counts=ctx.store.counts())  # fmt: skip


def shutdown(ctx: Context) -> OkReply:
    ctx.begin_shutdown()
    return OkReply(message=f"shutting down; {len(ctx.sched.by_job)} running job(s) checkpoint first")


def handle(ctx: Context, req_id: int, req: Request, local: bool = False) -> list[bytes]:
    """The one dispatch: a case per request type of dallm.protocol (tests/test_daemon_dispatch.py
    checks none is missing). local: the request came over the IPC socket (the daemon's own user)."""
    rep: Reply
    try:
        match req:
            case HistoryRequest():
                return history(ctx, req_id, req)
            case PingRequest():
                rep = ping(ctx)
            case SubmitRequest():
                rep = submit(ctx, req, local)
            case ListRequest():
                rep = JobListReply(jobs=ctx.store.list_jobs(req.states, req.limit))
            case ShowRequest():
                rep = show(ctx, req)
            case LogsRequest():
                rep = logs(ctx, req)
            case WorkerLogRequest():
                rep = worker_log(ctx, req)
            case ResourcesRequest():
                rep = resources(ctx)
            case StopRequest():
                rep = stop(ctx, req)
            case RollbackRequest():
                rep = rollback(ctx, req)
            case CancelRequest():
                rep = cancel(ctx, req)
            case CheckpointRequest():
                rep = checkpoint(ctx, req)
            case PriorityRequest():
                rep = priority(ctx, req)
            case ShutdownRequest():
                rep = shutdown(ctx)
            case _:
                assert_never(req)
    except ProtocolError as e:
        rep = ErrorReply(code=e.code, message=str(e))
    except ConfigError as e:
        rep = ErrorReply(code="invalid_config", message=str(e))
    return encode_reply(req_id, rep)
