"""The local executor: each worker is a child process of the daemon, in its own session (so a signal
reaches everything it started), seeing only its slot's GPU (CUDA_VISIBLE_DEVICES)."""

from __future__ import annotations

import contextlib
import os
import subprocess

from dallm.daemon.executors import WorkerSpec, worker_env


class LocalHandle:
    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.pid: int | None = proc.pid
        self.lost: str | None = None
        self.error: str | None = None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


class LocalExecutor:
    name = "local"

    def slots(self, devices: list[str], max_jobs: int | None) -> list[str]:
        from dallm.daemon.scheduler import make_slots

        return make_slots(devices, max_jobs)

    def endpoint(self, default: str) -> str:
        return default

    def start(self, spec: WorkerSpec) -> LocalHandle:
        env = worker_env(spec, os.environ)
        env["CUDA_VISIBLE_DEVICES"] = "" if spec.device == "cpu" else spec.device
        spec.log.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.log, "ab") as out:
            proc = subprocess.Popen(spec.argv(os.getpid()), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=spec.out.parent,
                                    start_new_session=True)  # fmt: skip
        return LocalHandle(proc)

    def release(self, identity: bytes) -> None:
        pass  # nothing kept per worker

    def close(self) -> None:
        pass
