"""The daemon: control socket (ROUTER, typed requests/replies), event socket (PUB), the worker
socket (ROUTER: events up, commands down), the store, and the scheduler, in one thread and loop.

Every event (a worker's engine events, job state changes) gets the next daemon-wide sequence number,
is committed to the store, then published: whatever a subscriber sees can be read back with a
history request. Batches of worker events are committed in one transaction.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import zmq
from pydantic import ValidationError

from dallm.config import ConfigError
from dallm.daemon import handlers, identity
from dallm.daemon.confine import Roots
from dallm.daemon.executors import make_executor
from dallm.daemon.jobstate import CancelPending, check_transition, decode_pending
from dallm.daemon.limits import CONTROL_RCVHWM, CONTROL_SNDHWM, StalledPeers
from dallm.daemon.packing import PeakBook
from dallm.daemon.scheduler import Scheduler, WorkerProc, outcome
from dallm.daemon.spill import STORE_ERRORS, Spill
from dallm.daemon.store import EventRow, Store
from dallm.home import DaemonLock, DaemonPaths, write_info
from dallm.protocol import (
    MAX_CONTROL_BYTES,
    MAX_WORKER_BYTES,
    QUEUE_TOPIC,
    WORKER_EVENT,
    WORKER_MESSAGE,
    CheckpointEvent,
    ErrorReply,
    FinishedEvent,
    InterruptCommand,
    JobCommand,
    JobState,
    JobStateEvent,
    LogEvent,
    MetricsEvent,
    ProtocolError,
    RollbackCommand,
    RolledBackEvent,
    StartedEvent,
    StopCommand,
    WorkerDone,
    WorkerHello,
    decode_request,
    encode_reply,
    envelope_frames,
    job_event_adapter,
    job_topic,
    summary_changes,
    worker_message_adapter,
)
from dallm.transport import (
    KeyWatch,
    check_key_folders,
    ensure_local_client_key,
    event_endpoint,
    is_loopback,
    make_curve_server,
    remote_keys,
    require_curve,
    server_keys,
    start_authenticator,
)

log = logging.getLogger("dallm.daemon")
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)
PUB_HWM = 10_000  # per subscriber; beyond it PUB drops (training never waits on a subscriber)


class Daemon:
    def __init__(
        self,
        home: Path,
        devices: list[str],
        max_jobs: int | None = None,
        bind: list[str] | None = None,
        runner: str | None = None,
        shutdown_timeout: float = 120.0,
        allow: tuple[Path, ...] = (),
        executor: str = "local",
        executor_options: dict[str, Any] | None = None,
    ) -> None:
        self.paths = DaemonPaths(home)
        self.paths.prepare()
        self.roots = Roots(self.paths.jobs, allow)
        self.lock = DaemonLock(self.paths)
        self.lock.acquire()
        # Before any socket: an executor that cannot work (no Ray, folders not shared) stops the start.
        ex = make_executor(executor, executor_options or {}, [self.paths.jobs, *allow])
        self.started = time.time()
        self.store = Store(self.paths.db)
        self.ctx = zmq.Context()
        self.auth = None
        self.keywatch: KeyWatch | None = None
        self.curve_control: set[zmq.Socket] = set()  # TCP control sockets: requests carry a User-Id
        self.control: list[zmq.Socket] = []
        self.pubs: list[zmq.Socket] = []
        self.event_endpoints: list[str] = []
        self._bind_ipc()
        for endpoint in bind or []:
            self._bind_tcp(endpoint)
        self.slots = ex.slots(devices, max_jobs)
        self.sched = Scheduler(
            self.slots, self.paths.endpoint("workers"), runner, ex, PeakBook(self.paths.db)
        )
        self.seq = self.store.head()
        self.topic_prev: dict[str, int] = self.store.topic_heads()
        self.batch: list[EventRow] = []
        self.out_frames: list[list[bytes]] = []
        self.job_updates: dict[int, dict[str, Any]] = {}
        self.spill = Spill()  # batches the store could not take yet (daemon/spill.py)
        self.shutting_down = False
        self.shutdown_deadline = 0.0
        self.shutdown_timeout = shutdown_timeout
        self.stop_loop = False
        self.stalled = StalledPeers()
        write_info(
            self.paths,
            {"pid": os.getpid(), "control": self.control_endpoints, "events": self.event_endpoints,
             "started": self.started},
        )  # fmt: skip
        self._recover()

    # --- sockets ------------------------------------------------------------------------------

    def _control_socket(self) -> zmq.Socket:
        s = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_BYTES)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, CONTROL_SNDHWM)  # see daemon/limits.py for the memory bound
        s.setsockopt(zmq.RCVHWM, CONTROL_RCVHWM)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full client queue raises Again instead of dropping silently
        return s

    def _pub_socket(self) -> zmq.Socket:
        s = self.ctx.socket(zmq.PUB)
        s.setsockopt(zmq.SNDHWM, PUB_HWM)
        s.setsockopt(zmq.LINGER, 0)
        return s

    def _bind_ipc(self) -> None:
        ctl, pub = self._control_socket(), self._pub_socket()
        ctl.bind(self.paths.endpoint("control"))
        pub.bind(self.paths.endpoint("events"))
        self.control.append(ctl)
        self.pubs.append(pub)
        self.control_endpoints = [self.paths.endpoint("control")]
        self.event_endpoints.append(self.paths.endpoint("events"))
        self.workers = self.ctx.socket(zmq.ROUTER)
        self.workers.setsockopt(zmq.MAXMSGSIZE, MAX_WORKER_BYTES)
        self.workers.setsockopt(zmq.RCVHWM, 100_000)
        self.workers.setsockopt(zmq.LINGER, 0)
        self.workers.bind(self.paths.endpoint("workers"))
        for name in ("control", "events", "workers"):
            with contextlib.suppress(OSError):
                os.chmod(self.paths.socket_dir / f"{name}.ipc", 0o600)

    def _bind_tcp(self, endpoint: str) -> None:
        """Every TCP bind is CURVE (a loopback port is open to every local user): the daemon's own
        user connects with the home's local key; others need a key in authorized/."""
        event_endpoint(endpoint)  # a malformed endpoint is refused before anything is set up
        require_curve()
        keys = self.paths.keys
        check_key_folders(keys)
        ensure_local_client_key(keys)
        if not is_loopback(endpoint) and not remote_keys(keys):
            raise RuntimeError(
                f"a TCP bind beyond loopback needs CURVE client keys: none in {keys / 'authorized'} "
                "(create one with `dallm-daemon keys --client NAME`)"
            )
        if self.auth is None:
            self.auth = start_authenticator(self.ctx, keys)
            self.keywatch = KeyWatch(self.auth, keys)
        ctl, pub = self._control_socket(), self._pub_socket()
        public, secret = server_keys(keys)
        make_curve_server(ctl, public, secret)
        make_curve_server(pub, public, secret)
        self.curve_control.add(ctl)
        ctl.bind(endpoint)
        pub.bind(event_endpoint(endpoint))
        self.control.append(ctl)
        self.pubs.append(pub)
        self.control_endpoints.append(endpoint)
        self.event_endpoints.append(event_endpoint(endpoint))

    # --- events -------------------------------------------------------------------------------

    def add_event(self, job: int, topic: str, kind: str, step: int | None, data: str, blob: bytes | None,
                  t: float | None = None) -> int:  # fmt: skip
        self.seq += 1
        seq = self.seq
        prev = self.topic_prev.get(topic, 0)
        self.topic_prev[topic] = seq
        t = time.time() if t is None else t
        self.batch.append((seq, prev, job, topic, kind, step, t, data, blob))
        self.out_frames.append(envelope_frames(seq, prev, topic, job, t, data, blob))
        return seq

    def flush(self) -> None:
        """Commit the batch, after any batches a failed write left waiting (in order); publish what
        was committed. A failed write keeps the batch in the spill: nothing is published before the
        store has it, so a subscriber can always read back what it saw."""
        if self.batch or self.job_updates:
            self.spill.push(self.batch, self.job_updates, self.out_frames)
            self.batch, self.job_updates, self.out_frames = [], {}, []
        if not self.spill:
            return
        written = self.spill.drain(self.store.add_events, self.store.mark_gap)
        more, last = _MORE, _LAST
        for pub in self.pubs:
            send = pub.send
            for frames in written:  # a PUB never blocks: it drops at a subscriber's HWM
                for frame in frames[:-1]:
                    send(frame, more)
                send(frames[-1], last)

    def set_state(self, job: int, state: JobState, reason: str, **fields: Any) -> None:
        self.flush()
        prev = self.store.transition(job, state, reason, check=check_transition, **fields)
        self.publish_state(job, prev, reason)
        log.info("job %s: %s -> %s (%s)", job, prev, state, reason)

    def publish_state(self, job: int, prev: str | None, reason: str) -> None:
        ev = JobStateEvent(job=self.store.summary(job), prev_state=prev, reason=reason)  # type: ignore[arg-type]
        self.add_event(job, QUEUE_TOPIC, "state", None, ev.model_dump_json(), None)
        self.flush()

    def job_log(self, job: int, level: str, message: str) -> None:
        ev = LogEvent(level=level, message=message)  # type: ignore[arg-type]
        self.add_event(job, job_topic(job), "log", None, ev.model_dump_json(), None)

    def command(self, w: WorkerProc, cmd: JobCommand) -> None:
        if w.hello:
            self.workers.send_multipart([w.identity, cmd.model_dump_json().encode()])
        else:
            w.pending.append(cmd)

    # --- worker messages ----------------------------------------------------------------------

    def _on_worker(self, frames: list[bytes]) -> None:
        w = self.sched.by_identity.get(frames[0])
        if w is None or len(frames) < 3:
            return  # a worker of an earlier attempt, or garbage
        tag = frames[1]
        if tag == WORKER_EVENT and len(frames) >= 4:
            self._on_event(w, frames)
        elif tag == WORKER_MESSAGE:
            msg = worker_message_adapter.validate_json(frames[2])
            if isinstance(msg, WorkerHello):
                w.hello = True
                for cmd in w.pending:
                    self.workers.send_multipart([w.identity, cmd.model_dump_json().encode()])
                w.pending.clear()
            elif isinstance(msg, WorkerDone):
                w.done = msg.result
            else:
                w.error = msg
                self.job_log(w.job, "error", msg.message)
                if msg.traceback:
                    self.job_log(w.job, "debug", msg.traceback)

    def _on_event(self, w: WorkerProc, frames: list[bytes]) -> None:
        raw = frames[3]
        try:
            ev = job_event_adapter.validate_json(raw)
            t = float(frames[2])
        except (ValidationError, ValueError):
            log.warning("job %s: dropped an invalid event %r", w.job, raw[:200])
            return
        job = w.job
        upd = self.job_updates.get(job)
        if upd is None:
            upd = self.job_updates[job] = {}
        upd.update(summary_changes(ev))  # the same fold as JobSummary.apply, into the store's row
        if type(ev) is MetricsEvent:  # the bulk: keep this path short
            w.last_step = ev.step
            self.add_event(job, job_topic(job), "metrics", ev.step, raw.decode(), None, t)
            return
        step = getattr(ev, "step", None)
        blob = frames[4] if len(frames) > 4 else None
        if isinstance(ev, StartedEvent | RolledBackEvent):
            # A resume (or a rollback) replaces the history after its step.
            after = ev.start_step if isinstance(ev, StartedEvent) else ev.step
            self.flush()
            self.store.supersede(job, after, self.seq + 1)
            w.last_step = after
            step = None if isinstance(ev, StartedEvent) else ev.step
            if after > 0 or isinstance(ev, RolledBackEvent):
                # The summary's KID must be one the kept history has, not an erased evaluation's.
                kid, std = self.store.kid_val_at(job, after)
                self.job_updates.setdefault(job, {}).update(kid_val=kid, kid_val_std=std)
        elif isinstance(ev, FinishedEvent):
            w.finished = ev
        self.add_event(job, job_topic(job), ev.kind, step, raw.decode(), blob, t)
        if isinstance(ev, StartedEvent) and ev.start_step > 0:
            self._backfill(job, ev.start_step)
        if isinstance(ev, RolledBackEvent):
            # Subscribers fold events into their rows (JobSummary.apply) but cannot know the KID the
            # kept history ends with: the whole row follows, as for any change of a job's row.
            self.flush()
            state = self.store.summary(job).state
            self.publish_state(job, state, f"rolled back to step {ev.step}")

    def _backfill(self, job: int, upto: int) -> None:
        """Metric steps up to the resume step that the store lacks (events a killed daemon never
        committed) are read back from the job's metrics.jsonl, so the history has no holes."""
        from dallm.protocol.files import METRICS_FILE, read_metrics

        self.flush()
        have = set(self.store.metric_steps(job))
        out = (self.store.job(job) or {}).get("out_dir") or "."
        missing = [
            r
            for r in read_metrics(Path(out) / METRICS_FILE)
            if r.get("step", 0) <= upto and r.get("step") not in have
        ]
        for row in missing:
            values = {k: float(v) for k, v in row.items()
                      if k != "step" and isinstance(v, int | float) and math.isfinite(v)}  # fmt: skip
            data = MetricsEvent(step=int(row["step"]), values=values).model_dump_json()
            self.add_event(job, job_topic(job), "metrics", int(row["step"]), data, None)
        if missing:
            self.job_log(
                job, "warning", f"{len(missing)} metric step(s) up to {upto} restored from metrics.jsonl"
            )
        self._backfill_checkpoints(job, Path(out), upto)

    def _backfill_checkpoints(self, job: int, out: Path, upto: int) -> None:
        """Checkpoint events up to the resume step that the store lacks, from the checkpoints/step-N
        folders on disk (a folder is only there once complete: it is renamed into place)."""
        from dallm.protocol.files import checkpoint_folders

        have = {c.step for c in self.store.checkpoints(job) if not c.superseded}
        missing = [(s, p) for s, p in checkpoint_folders(out / "checkpoints") if s <= upto and s not in have]
        for step, folder in missing:
            data = CheckpointEvent(step=step, path=str(folder.relative_to(out))).model_dump_json()
            self.add_event(job, job_topic(job), "checkpoint", step, data, None)
        if missing:
            self.job_log(job, "warning", f"{len(missing)} checkpoint event(s) up to {upto} restored from "
                         f"{out / 'checkpoints'}")  # fmt: skip

    def drain_workers(self, budget: int = 50_000) -> None:
        for _ in range(budget):
            try:
                frames = self.workers.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                self._on_worker(frames)
            except (ValidationError, ValueError) as e:
                log.warning("bad worker message: %s", e)
        self.flush()

    # --- control requests ---------------------------------------------------------------------

    def serve(self, sock: zmq.Socket, budget: int = 500) -> None:
        for _ in range(budget):
            try:
                raw = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            frames = [f.bytes for f in raw]
            ident, rest = frames[0], frames[1:]
            if self.stalled.stalled(ident):
                continue  # it has CONTROL_SNDHWM replies unread: no work for it for now
            prefix = [ident]
            if len(rest) > 1 and rest[0] == b"":
                prefix.append(b"")
                rest = rest[1:]
            req_id = 0
            try:
                if len(rest) != 1:
                    raise ProtocolError("bad_request", f"expected one frame, got {len(rest)}")
                req_id, req = decode_request(rest[0])
                if self.spill:  # an answer now would be stale or fail to commit: say why instead
                    raise ProtocolError("unavailable", self.spill.message())
                if sock in self.curve_control and not self._key_still_authorized(raw[-1]):
                    raise ProtocolError("unauthorized", "this client key is no longer authorized")
                reply = handlers.handle(self, req_id, req, local=sock is self.control[0])
            except ProtocolError as e:
                reply = encode_reply(req_id, ErrorReply(code=e.code, message=str(e)))
            except ConfigError as e:
                reply = encode_reply(req_id, ErrorReply(code="invalid_config", message=str(e)))
            except STORE_ERRORS as e:
                log.error("request failed on the store: %s", e)
                reply = encode_reply(
                    req_id,
                    ErrorReply(
                        code="unavailable",
                        message=f"the daemon's store cannot be written ({type(e).__name__}: {e})",
                    ),
                )
            except Exception as e:  # the daemon serves on whatever one request did
                log.exception("request failed")
                reply = encode_reply(req_id, ErrorReply(code="internal", message=f"{type(e).__name__}: {e}"))
            try:
                sock.send_multipart(prefix + reply, zmq.NOBLOCK)
            except zmq.Again:
                self.stalled.mark(ident)
            except zmq.ZMQError:
                pass  # the client has gone
            self.flush()

    def _key_still_authorized(self, frame: zmq.Frame) -> bool:
        """A CURVE connection outlives its key's removal from authorized/: check each request."""
        if self.keywatch is None:
            return False
        try:
            user = frame.get("User-Id")
        except zmq.ZMQError:
            return False
        return self.keywatch.allowed(user)

    def reload_keys(self) -> None:
        """SIGHUP: re-read authorized/ at the next loop turn."""
        if self.keywatch is not None:
            self.keywatch.request()

    # --- scheduling and workers ---------------------------------------------------------------

    def _recover(self) -> None:
        """Jobs a dead daemon left running are queued again and resume from their last checkpoint;
        a stop or rollback asked before it died is asked again, a cancel is carried out."""
        for job in self.store.ids_in("running", "stopping"):
            row = self.store.job(job) or {}
            pid = row.get("pid")
            if pid and identity.is_our_worker(self.paths.state_dir, job, pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            elif pid:
                log.info("job %s: pid %s is not its worker any more; left alone", job, pid)
            identity.forget(self.paths.state_dir, job)
            if isinstance(decode_pending(row.get("pending")), CancelPending):
                self.set_state(
                    job, "cancelled", "cancelled by user", pid=None, pending=None, ended=time.time()
                )
                continue
            self.set_state(job, "queued", "daemon restarted after an unclean stop; resumes from its last checkpoint",
                           resume_path=row.get("out_dir"), pid=None)  # fmt: skip

    def schedule(self) -> None:
        while not self.shutting_down and self.sched.free_slot() is not None:
            job = self.store.next_queued()
            if job is None:
                return
            row = self.store.job(job)
            assert row is not None
            slot = self.sched.slot_for(job, json.loads(row["config"]))
            if slot is None:
                return  # it waits for a GPU of its own (packing refused; the scheduler logged why)
            self.start_job(job, slot)

    def start_job(self, job: int, slot: int) -> None:
        row = self.store.job(job)
        assert row is not None
        out = Path(row["out_dir"])
        attempt = row["attempts"] + 1
        resume: Path | None = Path(row["resume_path"]) if row["resume_path"] else None
        if resume is not None and resume == out and not any((out / "checkpoints").glob("step-*")):
            resume = None  # nothing saved yet: start over
        try:
            out.mkdir(parents=True, exist_ok=True)
            cfg_path = out / "job-config.json"
            config = json.loads(row["config"])
            cfg_path.write_text(json.dumps(for_slot(config, self.sched.devices[slot])))
            w = self.sched.start(job, attempt, cfg_path, out, resume, out / "worker.log", slot, config)
        except Exception as e:  # a job that cannot start fails alone; the daemon serves on
            log.exception("job %s: cannot start", job)
            self.set_state(job, "failed", f"cannot start a worker: {type(e).__name__}: {e}", attempts=attempt)
            return
        identity.remember(self.paths.state_dir, job, w.proc.pid, w.token)
        pending = decode_pending(row["pending"])
        if isinstance(pending, StopCommand | RollbackCommand):  # asked before a restart: ask again
            w.pending.append(pending)
        how = (
            f"resuming from {resume.name if resume != out else 'its last checkpoint'}"
            if resume
            else "from step 0"
        )
        state: JobState = "running"
        reason = f"started on {w.device} (attempt {attempt}, {how})"
        if isinstance(pending, RollbackCommand) and not pending.resume:
            # It trains no step: it only writes (and evaluates) the result of `pending.step`.
            state, reason = (
                "stopping",
                f"writing the result of step {pending.step} on {w.device} (attempt {attempt})",
            )
        now = time.time()  # until the engine names its phase, the worker loads the model and data
        self.set_state(job, state, reason, attempts=attempt, pid=w.proc.pid, device=w.device,
                       started=now, phase="loading", phase_since=now)  # fmt: skip

    def reap(self) -> None:
        for w in self.sched.ended(time.time()):
            self.drain_workers()
            if self.spill:
                return  # the store cannot take its events (or its end) yet: reaped once it can
            row = self.store.job(w.job) or {}
            state, reason, resume = outcome(w, self.shutting_down, int(row.get("retries") or 0))
            if w.proc.returncode not in (0, None) and w.done is None and w.error is None:
                self.job_log(
                    w.job, "error", f"worker {reason}; see {Path(row.get('out_dir', '')) / 'worker.log'}"
                )
            fields: dict[str, Any] = {"pid": None, "resume_path": row.get("out_dir") if resume else None}
            if not resume:
                fields["pending"] = None  # the stop/rollback/cancel it carried is done
            if state not in ("queued",):
                fields["ended"] = time.time()
            if w.done is not None:
                fields |= {"result_step": w.done.result_step, "turning_point": w.done.turning_point}
            if row.get("history_gap") and not resume:  # never shown as if whole
                reason += f"; history incomplete: {row['history_gap']}"
            self.set_state(w.job, state, reason, **fields)
            self.sched.release(w)
            identity.forget(self.paths.state_dir, w.job)

    def begin_shutdown(self) -> None:
        if self.shutting_down:
            return
        self.shutting_down = True
        self.shutdown_deadline = time.time() + self.shutdown_timeout
        log.info("shutting down: %d running job(s) checkpoint first", len(self.sched.by_job))
        for w in self.sched.by_job.values():
            self.command(w, InterruptCommand())

    # --- loop ---------------------------------------------------------------------------------

    def run(self) -> int:
        poller = zmq.Poller()
        for s in self.control:
            poller.register(s, zmq.POLLIN)
        poller.register(self.workers, zmq.POLLIN)
        last_tick = 0.0
        while True:
            ready = dict(poller.poll(100))
            now = time.time()
            try:
                if self.workers in ready:
                    self.drain_workers()
                for s in self.control:
                    if s in ready:
                        self.serve(s)
                if now - last_tick >= 0.05 or not ready:
                    last_tick = now
                    if self.keywatch is not None and self.keywatch.poll(now):
                        log.info("authorized client keys re-read")
                    self.flush()  # retries held batches; jobs change state only once they are in
                    if not self.spill:
                        self.reap()
                        self.schedule()
            except Exception:  # a bug in one path must not take the daemon (and every job) down
                log.exception("daemon loop")
                self.batch, self.out_frames, self.job_updates = [], [], {}
                time.sleep(0.1)
            if self.shutting_down:
                if now > self.shutdown_deadline:
                    for w in list(self.sched.by_job.values()):
                        self.sched.kill(w, signal.SIGKILL)
                if not self.sched.by_job:
                    break
        self.close()
        return 0

    def close(self) -> None:
        self.flush()
        with contextlib.suppress(OSError):
            self.paths.info.unlink()
        for s in [*self.control, *self.pubs, self.workers]:
            s.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        self.sched.close()
        self.store.close()
        self.lock.release()


def for_slot(config: dict, device: str) -> dict:
    """A worker sees one GPU (CUDA_VISIBLE_DEVICES), as cuda:0: `cuda:N` in a config means that one."""
    train = config.get("train", {})
    if device != "cpu" and str(train.get("device", "")).startswith("cuda:"):
        config = {**config, "train": {**train, "device": "cuda"}}
    return config
