"""What an executor is given and gives back: a `WorkerSpec` in, a `Handle` out (daemon/executors/)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass
class WorkerSpec:
    """Everything a worker needs; `env` is added to the environment it runs in."""

    job: int
    attempt: int
    device: str  # the slot's device: "cpu", a CUDA index ("0"), or "ray"
    endpoint: str  # where the worker's DEALER connects
    config: Path
    out: Path
    resume: Path | None
    log: Path
    runner: str | None
    slot_cores: int | None
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, parent: int | None) -> list[str]:
        """The worker's command line (the same for every executor)."""
        cmd = [sys.executable, "-m", "dallm.daemon.worker", "--endpoint", self.endpoint,
               "--job", str(self.job), "--attempt", str(self.attempt), "--config", str(self.config),
               "--out", str(self.out)]  # fmt: skip
        if parent is not None:
            cmd += ["--parent", str(parent)]
        if self.slot_cores:
            cmd += ["--slot-cores", str(self.slot_cores)]
        if self.resume is not None:
            cmd += ["--resume", str(self.resume)]
        if self.runner:
            cmd += ["--runner", self.runner]
        return cmd


class Handle(Protocol):
    """A started worker, as the scheduler watches it."""

    pid: int | None  # a process on this machine (None when it runs elsewhere)
    returncode: int | None  # set once poll() saw it end; < 0: killed by that signal
    lost: str | None  # set when it ended with its machine (a node died): not the job's fault
    error: str | None  # one line when the executor knows why it failed (else the worker says)

    def poll(self) -> int | None: ...

    def signal(self, sig: int) -> None:
        """SIGTERM: end now (the worker's default handler); SIGKILL: end at once."""


class Executor(Protocol):
    name: str

    def slots(self, devices: list[str], max_jobs: int | None) -> list[str]:
        """The scheduler's slots: a device each ("cpu", a CUDA index, "ray")."""

    def endpoint(self, default: str) -> str:
        """Where workers connect (`default`: the daemon's IPC worker socket)."""

    def start(self, spec: WorkerSpec) -> Handle: ...

    def release(self, identity: bytes) -> None:
        """The worker `identity` has ended and been judged: forget it (its keys, its link)."""

    def close(self) -> None: ...


def worker_env(spec: WorkerSpec, base: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    env = dict(base)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(spec.env)
    return env
