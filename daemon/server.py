"""The daemon: control socket (ROUTER, typed requests/replies), event socket (PUB), the worker
socket (ROUTER: events up, commands down), the store, and the scheduler, in one thread and loop.

Daemon is put together from one part per idea: its sockets (daemon/sockets.py), the event log that
numbers, commits and publishes every event (daemon/events.py), worker messages
(daemon/worker_messages.py), control requests (daemon/control.py) and the jobs' life: scheduling,
start, reap, shutdown (daemon/lifecycle.py). This module holds the state they share and the loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import zmq

from dallm.client.home import DaemonLock, DaemonPaths, write_info
from dallm.client.transport import KeyWatch
from dallm.daemon import reconcile
from dallm.daemon.confine import Roots
from dallm.daemon.control import ControlServer
from dallm.daemon.executors import make_executor
from dallm.daemon.lifecycle import JobLifecycle
from dallm.daemon.limits import StalledPeers
from dallm.daemon.packing import PeakBook
from dallm.daemon.resources import ResourceSampler
from dallm.daemon.scheduler import Scheduler
from dallm.daemon.sockets import Sockets
from dallm.daemon.spill import Spill
from dallm.daemon.store import EventRow, Store

log = logging.getLogger("dallm.daemon")


class Daemon(Sockets, ControlServer, JobLifecycle):
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
        self.resources = ResourceSampler()  # answers ResourcesRequest (NVML opened once, if there)
        self.seq = self.store.head()
        self.topic_prev: dict[str, int] = self.store.topic_heads()
        self.batch: list[EventRow] = []
        self.out_frames: list[list[bytes]] = []
        self.job_updates: dict[int, dict[str, Any]] = {}
        self.folders: dict[int, Path] = {}  # job -> output folder, known without the store
        self.spill = Spill(folder_of=self.job_folder)  # batches the store could not take yet
        self.shutting_down = False
        self.shutdown_deadline = 0.0
        self.shutdown_timeout = shutdown_timeout
        self.stop_loop = False
        self.stalled = StalledPeers()
        self.waiting: list[bytes] | None = None  # a worker message held until the store works
        self.retry_at = 0.0
        write_info(
            self.paths,
            {"pid": os.getpid(), "control": self.control_endpoints, "events": self.event_endpoints,
             "started": self.started},
        )  # fmt: skip
        reconcile.recover(self)

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
                if self.workers in ready or self.waiting is not None:
                    self.drain_workers()
                for s in self.control:
                    if s in ready:
                        self.serve(s)
                if now - last_tick >= 0.05 or not ready:
                    last_tick = now
                    self._check_keys(now)
                    self.flush()  # retries held batches; jobs change state only once they are in
                    if not self.spill:
                        self.reap()
                        self.schedule()
                if self.waiting is not None:
                    time.sleep(0.01)  # the waiting message keeps the worker socket readable: no spin
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
