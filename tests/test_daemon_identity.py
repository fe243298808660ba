# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""Issue 13: a restarted daemon signals a stored pid only when it is the worker it recorded (token in
its environment, same start time): a reused pid, even one running `dallm.daemon.worker`, lives."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_helpers import config, daemons, home, wait_state  # noqa: F401

from dallm.client.home import DaemonPaths
from dallm.daemon import identity
from dallm.daemon.store import Store


def lookalike(env: dict[str, str] | None = None) -> subprocess.Popen:
    """A process with `dallm.daemon.worker` in its command line that is no worker of ours."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "-m", "dallm.daemon.worker"],
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def running_job_with_pid(home: Path, pid: int) -> int:
    paths = DaemonPaths(home)
    paths.prepare()
    store = Store(paths.db)
    job = store.add_job("victim", config("victim", steps=2), 0, 2, 0)
    store.update_job(job, out_dir=str(paths.jobs / f"{job}-victim"))
    store.transition(job, "running", "started", pid=pid, attempts=1)
    store.close()
    return job


@pytest.mark.parametrize("case", ["no record", "wrong token", "pid reused"])
def test_recovery_leaves_a_stranger_alone(daemons, home: Path, case: str) -> None:
    proc = lookalike({identity.TOKEN_ENV: "b" * 32})
    try:
        job = running_job_with_pid(home, proc.pid)
        run = DaemonPaths(home).state_dir
        if case == "wrong token":
            identity.remember(run, job, proc.pid, "a" * 32)
        elif case == "pid reused":  # the right token, but the recorded worker started at another time
            identity.remember(run, job, proc.pid, "b" * 32)
            rec = identity.record_path(run, job)
            rec.write_text(rec.read_text().replace('"start": ', '"start": 1'))
        d = daemons()
        with d.client() as c:
            wait_state(c, job, "finished")  # recovered: queued again and run by a new worker
        time.sleep(0.3)
        assert proc.poll() is None, "the daemon killed a process that was not its worker"
    finally:
        proc.kill()
        proc.wait(5)


def test_recovery_kills_its_own_recorded_worker(daemons, home: Path) -> None:
    proc = lookalike({identity.TOKEN_ENV: "c" * 32})
    try:
        job = running_job_with_pid(home, proc.pid)
        identity.remember(DaemonPaths(home).state_dir, job, proc.pid, "c" * 32)
        assert identity.is_our_worker(DaemonPaths(home).state_dir, job, proc.pid)
        daemons()
        assert proc.wait(10) is not None  # SIGKILLed at recovery
        record = identity.record_path(DaemonPaths(home).state_dir, job)
        deadline = time.monotonic() + 10  # the daemon forgets the record just after the kill
        while record.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not record.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
