"""Device slots and worker processes: which queued job runs next, starting workers, noticing when
they end, and what state a job goes to when its worker has ended (`outcome`).

Priorities first (higher runs sooner), then FIFO by id. One worker process per slot: a slot is a
CUDA device index (the worker sees only that device, CUDA_VISIBLE_DEVICES) or "cpu" (no CUDA).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dallm.daemon.identity import TOKEN_ENV, new_token
from dallm.protocol import FinishedEvent, JobCommand, JobResult, WorkerError

EXIT_GRACE_S = 0.3  # after a worker exits, wait this long for its last messages before judging it


def detect_devices(spec: str | None) -> list[str]:
    """`--devices`: "0,1" -> ["0", "1"], "cpu" -> ["cpu"], None/"auto" -> the GPUs nvidia-smi lists, else cpu."""
    if spec and spec != "auto":
        items = [s.strip() for s in spec.split(",") if s.strip()]
        if not items or any(not (s == "cpu" or s.isdigit()) for s in items):
            raise ValueError(f"--devices {spec!r}: use cpu or GPU indices like 0,1")
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


@dataclass
class WorkerProc:
    job: int
    attempt: int
    slot: int
    device: str
    proc: subprocess.Popen
    identity: bytes
    token: str = ""  # $DALLM_WORKER_TOKEN of the process (daemon/identity.py)
    started: float = field(default_factory=time.time)
    hello: bool = False
    pending: list[JobCommand] = field(default_factory=list)
    finished: FinishedEvent | None = None
    done: JobResult | None = None
    error: WorkerError | None = None
    last_step: int = 0
    cancel: bool = False
    exited_at: float | None = None
    kill_deadline: float | None = None


class Scheduler:
    def __init__(self, slots: list[str], endpoint: str, runner: str | None) -> None:
        from dallm.threads import usable_cores

        self.slot_cores = max(1, usable_cores() // len(slots))  # each worker's share of the CPU
        self.slots: list[WorkerProc | None] = [None] * len(slots)
        self.devices = slots
        self.endpoint = endpoint
        self.runner = runner
        self.by_job: dict[int, WorkerProc] = {}
        self.by_identity: dict[bytes, WorkerProc] = {}

    def free_slot(self) -> int | None:
        for i, w in enumerate(self.slots):
            if w is None:
                return i
        return None

    def start(
        self, job: int, attempt: int, config_path: Path, out_dir: Path, resume: Path | None, log: Path
    ) -> WorkerProc:
        slot = self.free_slot()
        assert slot is not None
        device = self.devices[slot]
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = "" if device == "cpu" else device
        env["PYTHONUNBUFFERED"] = "1"
        token = new_token()
        env[TOKEN_ENV] = token  # lets a restarted daemon tell this worker from a reused pid
        cmd = [sys.executable, "-m", "dallm.daemon.worker", "--endpoint", self.endpoint, "--job", str(job),
               "--attempt", str(attempt), "--config", str(config_path), "--out", str(out_dir),
               "--parent", str(os.getpid()), "--slot-cores", str(self.slot_cores)]  # fmt: skip
        if resume is not None:
            cmd += ["--resume", str(resume)]
        if self.runner:
            cmd += ["--runner", self.runner]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=out_dir.parent, start_new_session=True)  # fmt: skip
        w = WorkerProc(
            job,
            attempt,
            slot,
            "cpu" if device == "cpu" else f"cuda:{device}",
            proc,
            f"{job}.{attempt}".encode(),
            token=token,
        )
        self.slots[slot] = w
        self.by_job[job] = w
        self.by_identity[w.identity] = w
        return w

    def ended(self, now: float) -> list[WorkerProc]:
        """Workers that exited at least EXIT_GRACE_S ago (their last messages are in by then)."""
        out = []
        for w in list(self.by_job.values()):
            if w.exited_at is None and w.proc.poll() is not None:
                w.exited_at = now
            if w.kill_deadline is not None and w.exited_at is None and now > w.kill_deadline:
                self.kill(w, signal.SIGKILL)
            if w.exited_at is not None and now - w.exited_at >= EXIT_GRACE_S:
                out.append(w)
        return out

    def release(self, w: WorkerProc) -> None:
        self.slots[w.slot] = None
        self.by_job.pop(w.job, None)
        self.by_identity.pop(w.identity, None)

    def kill(self, w: WorkerProc, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(w.proc.pid, sig)
        if sig != signal.SIGKILL and w.kill_deadline is None:
            w.kill_deadline = time.time() + grace


def signal_name(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def result_outcome(done: JobResult, shutting_down: bool) -> tuple[str, str, bool]:
    """(state, reason, resume) for a job whose engine returned `done` (also read back from a
    result.json by daemon/reconcile.py)."""
    r = done.reason
    if r == "interrupted":
        why = "daemon stopped" if shutting_down else "interrupted"
        return "queued", f"{why} at step {done.final_step}; resumes from its checkpoint", True
    if r == "completed":
        return "finished", f"completed {done.final_step} steps", False
    if r == "early_stop":
        tp = done.turning_point
        result = "result: its weights" if tp == done.result_step else f"result: step {done.result_step}"
        at = f" at step {tp}" if tp is not None else ""
        return (
            "stopped-early",
            f"early stop at step {done.final_step} (turning point{at}); {result}",
            False,
        )
    if r == "stopped":
        return (
            "stopped-early",
            f"stopped at step {done.final_step}; result is step {done.result_step}",
            False,
        )
    if r == "rolled_back":
        return "stopped-early", f"rolled back to step {done.result_step}", False
    return "finished", f"finished ({r}) at step {done.final_step}", False


def outcome(w: WorkerProc, shutting_down: bool, retries: int) -> tuple[str, str, bool]:
    """(state, reason, resume) for a job whose worker ended."""
    if w.cancel:
        return "cancelled", "cancelled by user", False
    if w.done is not None:
        return result_outcome(w.done, shutting_down)
    if w.error is not None:
        return "failed", w.error.message, False
    how = signal_name(w.proc.returncode)
    if shutting_down:
        return "queued", f"daemon stopped ({how} at step {w.last_step}); resumes from its checkpoint", True
    if w.attempt <= retries:
        return (
            "queued",
            f"worker died ({how}) at step {w.last_step}; retry {w.attempt}/{retries} from its checkpoint",
            True,
        )
    return "failed", f"worker died ({how}) at step {w.last_step}", False
