"""The local executor: each worker is a child process of the daemon, in its own session (so a signal
reaches everything it started), seeing only its slot's GPU (CUDA_VISIBLE_DEVICES); and this machine's devices (`--devices`) as slots."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

from dallm.daemon.executors.spec import WorkerSpec, worker_env
from dallm.jobfiles import append_fd


def detect_devices(spec: str | None) -> list[str]:
    """`--devices`: "0,1" -> ["0", "1"], "0x2,1" -> ["0", "0", "1"] (two slots on GPU 0: packing,
    daemon/packing.py), "cpu" -> ["cpu"], None/"auto" -> the GPUs nvidia-smi lists, else cpu."""
    if spec and spec != "auto":
        items: list[str] = []
        for part in (s.strip() for s in spec.split(",")):
            gpu, x, count = part.partition("x")
            if part == "cpu":
                items.append(part)
            elif gpu.isdigit() and (not x or (count.isdigit() and 1 <= int(count) <= 16)):
                items += [gpu] * (int(count) if x else 1)
            else:
                raise ValueError(
                    f"--devices {spec!r}: {part!r} is not cpu, a GPU index (0) or GPU x slots (0x2)"
                )
        return items
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
            gpus = [line for line in out.splitlines() if line.startswith("GPU ")]
            if gpus:
                return [str(i) for i in range(len(gpus))]
        except (OSError, subprocess.SubprocessError):
            pass
    return ["cpu"]


def make_slots(devices: list[str], max_jobs: int | None) -> list[str]:
    """One slot per GPU; with only a CPU, `max_jobs` CPU slots (default 1). `max_jobs` caps GPUs too."""
    if devices == ["cpu"]:
        return ["cpu"] * max(1, max_jobs or 1)
    return devices[:max_jobs] if max_jobs else devices


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
        return make_slots(devices, max_jobs)

    def endpoint(self, default: str) -> str:
        return default

    def start(self, spec: WorkerSpec) -> LocalHandle:
        env = worker_env(spec, os.environ)
        env["CUDA_VISIBLE_DEVICES"] = "" if spec.device == "cpu" else spec.device
        # cwd: the job folder, which no one else may enter: a relative name the engine resolves (a hub
        # id that is also a folder name) never finds something another user planted.
        with os.fdopen(append_fd(spec.log.parent, spec.log.name), "ab") as out:  # no planted link
            proc = subprocess.Popen(spec.argv(os.getpid()), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=spec.out,
                                    start_new_session=True)  # fmt: skip
        return LocalHandle(proc)

    def release(self, identity: bytes) -> None:
        pass  # nothing kept per worker

    def close(self) -> None:
        pass
