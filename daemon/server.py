"""The daemon: control socket (ROUTER, typed requests/replies), event socket (PUB), the worker
socket (ROUTER: events up, commands down), the store, and the scheduler, in one thread and loop.

Daemon holds one object per idea and wires them; none of them knows Daemon:
- Sockets (daemon/sockets.py): every socket, publishing, a CURVE key's check, closing;
- EventLog (daemon/events.py): numbers, commits (through the spill when the store fails), publishes;
- JobService (daemon/jobs.py): every change of a job's state (the table in daemon/jobstate.py);
- WorkerMessages (daemon/worker_messages.py): worker events in, commands down;
- JobLifecycle (daemon/lifecycle.py): scheduling, start, reap, shutdown;
- ControlServer (daemon/control.py): control requests, answered by daemon/handlers.py (one dispatch,
  a narrow Context);
- Reconciler (daemon/reconcile.py): what a dead daemon or a resume left in the job folders;
- revoke (daemon/revoke.py): a removed client key's subscriptions cut.
This module holds the wiring and the loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import zmq

from dallm.client.home import DaemonLock, DaemonPaths, write_info
from dallm.daemon import handlers, revoke
from dallm.daemon.confine import Roots
from dallm.daemon.control import ControlServer
from dallm.daemon.events import EventLog
from dallm.daemon.executors import make_executor
from dallm.daemon.jobs import JobService
from dallm.daemon.lifecycle import JobLifecycle
from dallm.daemon.packing import PeakBook
from dallm.daemon.reconcile import Reconciler
from dallm.daemon.resources import ResourceSampler
from dallm.daemon.scheduler import Scheduler
from dallm.daemon.sockets import Sockets
from dallm.daemon.store import Store
from dallm.daemon.worker_messages import WorkerMessages

log = logging.getLogger("dallm.daemon")


class Daemon:
    """The collaborators, wired, and the loop that drives them."""

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
        roots = Roots(self.paths.jobs, allow)
        self.lock = DaemonLock(self.paths)
        self.lock.acquire()
        # Before any socket: an executor that cannot work (no Ray, folders not shared) stops the start.
        ex = make_executor(executor, executor_options or {}, [self.paths.jobs, *allow])
        started = time.time()
        self.store = Store(self.paths.db)
        self.sockets = Sockets(self.paths, bind or [])
        self.slots = ex.slots(devices, max_jobs)
        self.sched = Scheduler(
            self.slots, self.paths.endpoint("workers"), runner, ex, PeakBook(self.paths.db)
        )
        self.events = EventLog(self.store, self.sockets.publish)
        self.jobs = JobService(self.store, self.events)
        self.reconciler = Reconciler(self.store, self.events, self.jobs, self.paths.state_dir)
        self.worker_messages = WorkerMessages(self.sockets.workers, self.sched, self.store, self.events,
                                              self.jobs, self.reconciler)  # fmt: skip
        self.lifecycle = JobLifecycle(self.store, self.sched, self.events, self.jobs, self.worker_messages,
                                      self.paths.state_dir, shutdown_timeout, roots.for_request(False, None))  # fmt: skip
        context = handlers.Context(
            store=self.store, jobs=self.jobs, events=self.events, sched=self.sched,
            command=self.worker_messages.command, schedule=self.lifecycle.schedule,
            shutting_down=lambda: self.lifecycle.shutting_down, begin_shutdown=self.lifecycle.begin_shutdown,
            resources=ResourceSampler(),  # answers ResourcesRequest (NVML opened once, if there)
            roots=roots, paths=self.paths, started=started, slots=self.slots,
            event_endpoints=self.sockets.event_endpoints,
        )  # fmt: skip
        self.control = ControlServer(self.sockets, self.events, context)
        write_info(
            self.paths,
            {"pid": os.getpid(), "control": self.sockets.control_endpoints,
             "events": self.sockets.event_endpoints, "started": started},
        )  # fmt: skip
        self.reconciler.recover()

    def begin_shutdown(self, hurry: bool = False) -> None:
        self.lifecycle.begin_shutdown(hurry)

    def reload_keys(self) -> None:
        self.sockets.reload_keys()

    def run(self) -> int:
        poller = zmq.Poller()
        workers = self.sockets.workers
        for s in self.sockets.control:
            poller.register(s, zmq.POLLIN)
        poller.register(workers, zmq.POLLIN)
        last_tick = 0.0
        while True:
            ready = dict(poller.poll(100))
            now = time.time()
            try:
                if workers in ready or self.worker_messages.waiting is not None:
                    self.worker_messages.drain()
                for s in self.sockets.control:
                    if s in ready:
                        self.control.serve(s)
                if now - last_tick >= 0.05 or not ready:
                    last_tick = now
                    revoke.check(self.sockets, now)
                    self.events.flush()  # retries held batches; jobs change state only once they are in
                    if not self.events.spill:
                        self.lifecycle.reap()
                        self.lifecycle.schedule()
                if self.worker_messages.waiting is not None:
                    time.sleep(0.01)  # the waiting message keeps the worker socket readable: no spin
            except Exception:  # a bug in one path must not take the daemon (and every job) down
                log.exception("daemon loop")
                self.events.discard()
                time.sleep(0.1)
            if self.lifecycle.shutting_down and self.lifecycle.end_of_shutdown(now):
                break
        self.close()
        return 0

    def close(self) -> None:
        self.events.flush()
        with contextlib.suppress(OSError):
            self.paths.info.unlink()
        self.sockets.close()
        self.sched.close()
        self.store.close()
        self.lock.release()
