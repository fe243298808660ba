"""Helpers for daemon tests: short temp homes (IPC paths are limited to ~107 bytes), a daemon run as a
child process (always killed at teardown), job configs for the fake engine."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dallm.client.client import DaemonClient, DaemonError
from dallm.protocol import TERMINAL_STATES, JobSummary

FAKE = "dallm.testing.fake_engine:train"


class DaemonProc:
    def __init__(
        self, home: Path, *args: str, runner: str | None = FAKE, step_s: float = 0.02, **env: str
    ) -> None:
        self.home = home
        self.args = list(args)
        self.env = dict(os.environ)
        self.env.pop("DALLM_CONNECT", None)
        self.env["DALLM_FAKE_STEP_S"] = str(step_s)
        # Test data and outputs live in the temp folder: allow it (DALLM_ALLOW="" for none).
        self.env["DALLM_ALLOW"] = tempfile.gettempdir()
        if runner:
            self.env["DALLM_JOB_RUNNER"] = runner
        else:
            self.env.pop("DALLM_JOB_RUNNER", None)
        self.env.update(env)
        self.proc: subprocess.Popen | None = None
        self.prefix: list[str] = []  # before the daemon's command line (`prlimit --nofile=N:N`)

    def start(self, timeout: float = 30.0) -> DaemonProc:
        cmd = [
            *self.prefix,
            sys.executable,
            "-m",
            "dallm.daemon.cli",
            "start",
            "--foreground",
            "--home",
            str(self.home),
            *self.args,
        ]
        log = open(self.home.parent / f"daemon-{time.time():.3f}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            try:
                if DaemonClient(home=self.home, timeout=0.5).ping().pid == self.proc.pid:
                    return self
            except DaemonError:
                pass
            time.sleep(0.05)
        raise RuntimeError("daemon did not start: " + self.log_text()[-2000:])

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.home.parent.glob("daemon-*.log")))

    def client(self, timeout: float = 10.0) -> DaemonClient:
        return DaemonClient(home=self.home, timeout=timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with_suppress(lambda: os.killpg(self.proc.pid, signal.SIGKILL))
            self.proc.wait(10)
        kill_workers(self.home)


def with_suppress(fn: Callable[[], Any]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
        fn()


def kill_workers(home: Path) -> None:
    """Workers die with their daemon (PDEATHSIG); this catches any straggler of this home."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"dallm.daemon.worker" in cmd and str(home).encode() in cmd:
            with_suppress(lambda p=int(proc.name): os.kill(p, signal.SIGKILL))


@pytest.fixture
def home() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="dd", dir="/tmp"))
    yield root / "h"
    kill_workers(root / "h")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def daemons(home: Path) -> Iterator[Callable[..., DaemonProc]]:
    """daemons(*args, runner=FAKE, step_s=0.02) -> a started DaemonProc on `home`; all killed at teardown."""
    started: list[DaemonProc] = []

    def start(*args: str, **kw: Any) -> DaemonProc:
        d = DaemonProc(home, *args, **kw)
        started.append(d)
        return d.start()

    yield start
    for d in started:
        d.cleanup()


@functools.cache
def fake_data_dir() -> str:
    """One folder of two valid images per test process: the fake engine reads no data, but the
    daemon's submit preflight refuses a job without usable images."""
    from conftest import write_images

    folder = Path(tempfile.mkdtemp(prefix="dallm-fake-data-"))
    atexit.register(shutil.rmtree, folder, True)
    return str(write_images(folder, 2))


def config(name: str = "job", steps: int = 20, every: int = 5, **sections: dict[str, Any]) -> dict[str, Any]:
    """A job config dict for the fake engine (the fake reads no data; the folder passes the preflight)."""
    cfg: dict[str, Any] = {
        "name": name,
        "data": {"dir": fake_data_dir(), "instance_prompt": "a red circle"},
        "train": {"steps": steps},
        "monitor": {"window": 2},
        "checkpoint": {"every": every, "keep": None},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    return cfg


def wait_state(c: DaemonClient, job: int, states: set[str] | str, timeout: float = 30.0) -> JobSummary:
    states = {states} if isinstance(states, str) else states
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = c.summary(job)
        if s.state in states:
            return s
        time.sleep(0.05)
    raise AssertionError(f"job {job} is {c.summary(job).state} ({c.summary(job).reason}), not {states}")


def wait_step(c: DaemonClient, job: int, step: int, timeout: float = 30.0) -> JobSummary:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = c.summary(job)
        if s.step >= step:
            return s
        if s.state in TERMINAL_STATES:
            raise AssertionError(f"job {job} ended ({s.state}: {s.reason}) before step {step}")
        time.sleep(0.02)
    raise AssertionError(f"job {job} did not reach step {step}")


def metric_steps(c: DaemonClient, job: int, include_superseded: bool = False) -> list[int]:
    from dallm.protocol import MetricsEvent, job_topic

    events, _ = c.history_all(0, [job_topic(job)], kinds=["metrics"])
    return [
        e.event.step
        for e in events
        if isinstance(e.event, MetricsEvent) and (include_superseded or not e.superseded)
    ]


def ended_then_killed(d: DaemonProc, steps: int) -> tuple[int, Path, int]:
    """A job run to its end, then the daemon killed -9: (job, its folder, the store's last seq)."""
    with d.client() as c:
        job = c.submit(config("left", steps=steps, every=steps)).id
        out = Path(wait_state(c, job, set(TERMINAL_STATES)).out_dir)
    d.kill9()
    db = sqlite3.connect(d.home / "dallm.db")
    head = db.execute("SELECT MAX(seq) FROM events").fetchone()[0]
    db.close()
    return job, out, head
