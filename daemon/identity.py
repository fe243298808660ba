"""Worker identity: before a restarted daemon signals a worker an earlier daemon left behind, it makes
sure the pid is still that worker, not a reused pid (another daemon's worker, any process).

Each worker gets a random token in its environment ($DALLM_WORKER_TOKEN); the daemon records
{pid, token, start} in <run>/workers/<job>.json (0600 in the 0700 run folder), where `start` is the
process start time in clock ticks since boot (/proc/<pid>/stat field 22). A pid is ours when its
start time matches and its environment holds the token (/proc/<pid>/environ is readable only by
the process's owner, so another user's process never matches).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path

TOKEN_ENV = "DALLM_WORKER_TOKEN"


def new_token() -> str:
    return secrets.token_hex(16)


def start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks after boot), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 overall; fields[0] is field 3
    except (IndexError, ValueError):
        return None


def has_token(pid: int, token: str) -> bool:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{TOKEN_ENV}={token}".encode() in env.split(b"\0")


def record_path(run_dir: Path, job: int) -> Path:
    return run_dir / "workers" / f"{job}.json"


def remember(run_dir: Path, job: int, pid: int | None, token: str) -> None:
    """Record the worker of `job` (written before the job is marked running). None: it runs on
    another machine (a Ray task), so there is no process here to signal later."""
    if pid is None:
        return
    path = record_path(run_dir, job)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": pid, "token": token, "start": start_ticks(pid)}, f)
    tmp.replace(path)


def forget(run_dir: Path, job: int) -> None:
    with contextlib.suppress(OSError):
        record_path(run_dir, job).unlink()


def is_our_worker(run_dir: Path, job: int, pid: int) -> bool:
    """True only when `pid` is the very worker recorded for `job`: same pid, same start time, token
    in its environment. Without a record (or with any doubt) False: never signal a stranger."""
    try:
        rec = json.loads(record_path(run_dir, job).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(rec, dict) or rec.get("pid") != pid or not isinstance(rec.get("token"), str):
        return False
    start = start_ticks(pid)
    return start is not None and start == rec.get("start") and has_token(pid, rec["token"])
