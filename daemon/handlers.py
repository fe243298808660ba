"""Control requests: one function per request type, each returning the reply frames.

Errors a client can act on are `ProtocolError(code, message)`, sent back as ErrorReply: one line each.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from dallm.config import ConfigError, config_from_dict
from dallm.daemon.confine import check_reads, output_folder
from dallm.daemon.jobstate import CancelPending, encode_pending
from dallm.daemon.limits import MAX_HISTORY_PAGE, page_rows
from dallm.daemon.resources import RunningWorker
from dallm.preflight import PreflightError, preflight
from dallm.protocol import (
    TERMINAL_STATES,
    CancelRequest,
    CheckpointNowCommand,
    CheckpointRequest,
    ErrorReply,
    HistoryRequest,
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

if TYPE_CHECKING:
    from dallm.daemon.server import Daemon


def _job(d: Daemon, ref: str) -> dict:
    row = d.store.find_job(ref)
    if row is None:
        raise ProtocolError("not_found", f"no job {ref!r}")
    return row


def submit(d: Daemon, req: SubmitRequest, local: bool = False) -> JobReply:
    """Queue a job whose outputs and inputs lie under the daemon's roots (daemon/confine.py)."""
    if d.shutting_down:
        raise ProtocolError("conflict", "the daemon is shutting down")
    cfg = config_from_dict(json.loads(json.dumps(req.config)), req.source)
    roots = d.roots.for_request(local, req.config_dir)
    check_reads(cfg, req.source, roots)  # before the preflight looks at anything: no existence leak
    try:  # the same preflight as `dallm submit`, as the daemon's machine sees the files
        preflight(cfg)
    except PreflightError as e:
        raise ProtocolError("preflight_failed", f"{req.source}: {e}") from None
    data = cfg.model_dump(mode="json")
    out_spec = data.get("output_dir")
    output_folder(d.paths.jobs, 0, cfg.name, out_spec, roots, req.source)  # refuse before anything is queued
    job = d.store.add_job(cfg.name, data, req.priority, cfg.train.steps, req.retries)
    out = output_folder(d.paths.jobs, job, cfg.name, out_spec, roots, req.source)
    d.store.update_job(job, out_dir=str(out))
    d.publish_state(job, None, "submitted")
    d.schedule()
    return JobReply(job=d.store.summary(job), message=f"job {job} queued")


def show(d: Daemon, req: ShowRequest) -> JobDetailReply:
    row = _job(d, req.job)
    job = row["id"]
    out = Path(row["out_dir"] or ".")
    checkpoints = [c for c in d.store.checkpoints(job) if c.superseded or (out / c.path).exists()]
    detail = JobDetail(
        summary=d.store.summary(job),
        config=json.loads(row["config"]),
        transitions=d.store.transitions(job),
        checkpoints=checkpoints,
        last_metrics=d.store.last_metrics(job),
    )
    return JobDetailReply(detail=detail)


def stop(d: Daemon, req: StopRequest) -> JobReply:
    row = _job(d, req.job)
    job, state = row["id"], row["state"]
    w = d.sched.by_job.get(job)
    if state == "queued":
        raise ProtocolError("conflict", f"job {job} is queued, not running; `dallm cancel {job}` discards it")
    if w is None or state != "running":
        raise ProtocolError("conflict", f"job {job} is {state}")
    d.command(w, StopCommand())
    # `pending` survives a daemon crash: the resumed job is told again (see Daemon._recover).
    d.set_state(job, "stopping", "stop requested: finish now (turning point weights when found)",
                pending=encode_pending(StopCommand()))  # fmt: skip
    return JobReply(job=d.store.summary(job), message=f"job {job} stopping")


def rollback(d: Daemon, req: RollbackRequest) -> JobReply:
    row = _job(d, req.job)
    job, state = row["id"], row["state"]
    how = "and resume" if req.resume else "and finish there"
    w = d.sched.by_job.get(job)
    if state in ("running", "stopping") and w is not None:
        if req.step > max(w.last_step, row["step"]):
            raise ProtocolError(
                "conflict",
                f"job {job} is at step {max(w.last_step, row['step'])}; cannot roll back to {req.step}",
            )
        d.command(w, RollbackCommand(step=req.step, resume=req.resume))
        if req.resume:
            d.job_log(job, "info", f"rollback to step {req.step} requested (resume)")
            d.flush()
        else:
            cmd = encode_pending(RollbackCommand(step=req.step, resume=False))
            d.set_state(job, "stopping", f"rollback to step {req.step} {how} requested", pending=cmd)
        return JobReply(job=d.store.summary(job), message=f"job {job}: rolling back to step {req.step}")
    if state == "queued":
        raise ProtocolError("conflict", f"job {job} is queued; nothing to roll back")
    out = Path(row["out_dir"])
    kept = {c.step: out / c.path for c in d.store.checkpoints(job) if (out / c.path).is_dir()}
    ckpt = kept.get(req.step)
    if ckpt is None:
        have = ", ".join(map(str, sorted(kept))) or "none"
        raise ProtocolError("not_found", f"job {job} has no checkpoint at step {req.step} (have: {have})")
    pending = None if req.resume else encode_pending(RollbackCommand(step=req.step, resume=False))
    why = f"rollback to step {req.step} {how}"
    if d.sched.free_slot() is None:  # writing the result loads the model: it takes a slot too
        busy = ", ".join(map(str, sorted(d.sched.by_job))) or "none"
        why += f"; waits for a free slot (running: job {busy})"
    d.set_state(
        job,
        "queued",
        why,
        resume_path=str(ckpt),
        pending=pending,
        ended=None,
    )
    d.schedule()
    return JobReply(job=d.store.summary(job), message=f"job {job}: rolling back to step {req.step}")


def cancel(d: Daemon, req: CancelRequest) -> JobReply:
    row = _job(d, req.job)
    job, state = row["id"], row["state"]
    if state in TERMINAL_STATES:
        raise ProtocolError("conflict", f"job {job} is already {state}")
    w = d.sched.by_job.get(job)
    if w is not None:
        w.cancel = True
        d.sched.kill(w)
        d.set_state(job, "stopping", "cancel requested", pending=encode_pending(CancelPending()))
    else:
        d.set_state(
            job, "cancelled", "cancelled by user (never ran)" if not row["attempts"] else "cancelled by user"
        )
    return JobReply(job=d.store.summary(job), message=f"job {job} cancelled")


def checkpoint(d: Daemon, req: CheckpointRequest) -> JobReply:
    row = _job(d, req.job)
    w = d.sched.by_job.get(row["id"])
    if w is None or row["state"] != "running":
        raise ProtocolError("conflict", f"job {row['id']} is {row['state']}, not running")
    d.command(w, CheckpointNowCommand())
    return JobReply(job=d.store.summary(row["id"]), message=f"job {row['id']}: checkpoint requested")


def priority(d: Daemon, req: PriorityRequest) -> JobReply:
    row = _job(d, req.job)
    job = row["id"]
    d.store.update_job(job, priority=req.priority)
    d.publish_state(job, row["state"], f"priority set to {req.priority}")
    return JobReply(job=d.store.summary(job), message=f"job {job}: priority {req.priority}")


def logs(d: Daemon, req: LogsRequest) -> LogsReply:
    job = _job(d, req.job)["id"]
    lines = []
    for seq, t, kind, data in d.store.log_events(job, req.since):
        ev = json.loads(data)
        if kind == "log":
            lines.append(LogLine(seq=seq, t=t, level=ev["level"], message=ev["message"]))
        else:
            lines.append(
                LogLine(seq=seq, t=t, level="state", message=f"{ev['job']['state']}: {ev['reason']}")
            )
    return LogsReply(lines=lines, head=d.seq)


WORKER_LOG = "worker.log"  # in the job's output folder (Daemon.start_job: stdout and stderr)


def worker_log(d: Daemon, req: WorkerLogRequest) -> WorkerLogReply:
    """A tail of the worker's log, or what was added since `offset`: whole lines only, so that a
    follower never splits one (a single line longer than `max_bytes` comes cut)."""
    row = _job(d, req.job)
    path = Path(row["out_dir"] or ".") / WORKER_LOG
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if req.offset is None:
                start = max(0, size - req.max_bytes)
            else:
                start = req.offset if req.offset <= size else 0  # shorter than before: a new file
            f.seek(start)
            data = f.read(min(req.max_bytes, size - start))
    except FileNotFoundError:
        return WorkerLogReply(path=str(path), text="", start=0, end=0, size=0)
    except OSError as e:
        raise ProtocolError("conflict", f"job {row['id']}: cannot read {path}: {e.strerror}") from None
    if req.offset is None and start > 0 and b"\n" in data:
        cut = data.index(b"\n") + 1  # a tail starts at a line's start
        data, start = data[cut:], start + cut
    if not data.endswith(b"\n") and b"\n" in data:
        data = data[: data.rindex(b"\n") + 1]  # the last line is still being written
    elif not data.endswith(b"\n") and len(data) < req.max_bytes:
        data = b""  # one unfinished line: wait for its end
    text = data.decode("utf-8", errors="replace")
    return WorkerLogReply(path=str(path), text=text, start=start, end=start + len(data), size=size)


def resources(d: Daemon) -> ResourcesReply:
    # A worker on another machine (an executor's node: pid None) is not sampled here.
    workers = [
        RunningWorker(job, w.proc.pid, w.device)
        for job, w in sorted(d.sched.by_job.items())
        if w.proc.pid is not None
    ]
    return d.resources.sample(workers)


def handle(d: Daemon, req_id: int, req: Request, local: bool = False) -> list[bytes]:
    """local: the request came over the IPC socket (the daemon's own user)."""
    try:
        if isinstance(req, HistoryRequest):
            limit = min(req.limit, MAX_HISTORY_PAGE)
            rows = d.store.history(req.since, req.topics, limit, req.kinds)
            if not req.include_png:
                rows = [(*r[:7], None) for r in rows]
            rows, more = page_rows(rows, limit)
            return history_frames(req_id, rows, d.seq, more)
        if isinstance(req, PingRequest):
            rep = PongReply(pid=os.getpid(), home=str(d.paths.home), started=d.started, head=d.seq,
                            slots=d.slots, events=d.event_endpoints, counts=d.store.counts())  # fmt: skip
        elif isinstance(req, SubmitRequest):
            rep = submit(d, req, local)
        elif isinstance(req, ListRequest):
            rep = JobListReply(jobs=d.store.list_jobs(req.states, req.limit))
        elif isinstance(req, ShowRequest):
            rep = show(d, req)
        elif isinstance(req, LogsRequest):
            rep = logs(d, req)
        elif isinstance(req, WorkerLogRequest):
            rep = worker_log(d, req)
        elif isinstance(req, ResourcesRequest):
            rep = resources(d)
        elif isinstance(req, StopRequest):
            rep = stop(d, req)
        elif isinstance(req, RollbackRequest):
            rep = rollback(d, req)
        elif isinstance(req, CancelRequest):
            rep = cancel(d, req)
        elif isinstance(req, CheckpointRequest):
            rep = checkpoint(d, req)
        elif isinstance(req, PriorityRequest):
            rep = priority(d, req)
        elif isinstance(req, ShutdownRequest):
            d.begin_shutdown()
            rep = OkReply(message=f"shutting down; {len(d.sched.by_job)} running job(s) checkpoint first")
        else:  # pragma: no cover - the adapter admits nothing else
            rep = ErrorReply(code="bad_request", message="unknown request")
    except ProtocolError as e:
        rep = ErrorReply(code=e.code, message=str(e))
    except ConfigError as e:
        rep = ErrorReply(code="invalid_config", message=str(e))
    return encode_reply(req_id, rep)
