"""Where a daemon lives (shared by the daemon and its clients): its home (0700), the run folder with
its sockets, pidfile and lock.

    <home>/dallm.db           the store (SQLite, WAL)
    <home>/daemon.log         the log of a background daemon
    <home>/jobs/<id>-<name>/  job output folders (unless a config names an absolute output_dir)
    <home>/keys/              CURVE keys for a TCP bind: server.key(_secret), authorized/*.key
    <run>/control.ipc, events.ipc, workers.ipc    the sockets (<run> is <home>/run, 0700)
    <home>/run/daemon.lock    flock held by the running daemon; daemon.json: its pid and endpoints

IPC socket paths are limited to ~107 bytes: when <home>/run is too long, the sockets go to a short
0700 folder under /tmp named after a hash of the home.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dallm.client.private import make_private_dir

IPC_PATH_MAX = 100


def default_home() -> Path:
    env = os.environ.get("DALLM_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("dallm", appauthor=False))


def resolve_home(home: str | Path | None) -> Path:
    return (Path(home).expanduser() if home else default_home()).absolute()


@dataclass(frozen=True)
class DaemonPaths:
    home: Path

    @property
    def db(self) -> Path:
        return self.home / "dallm.db"

    @property
    def log(self) -> Path:
        return self.home / "daemon.log"

    @property
    def jobs(self) -> Path:
        return self.home / "jobs"

    @property
    def keys(self) -> Path:
        return self.home / "keys"

    @property
    def state_dir(self) -> Path:
        return self.home / "run"

    @property
    def lock(self) -> Path:
        return self.state_dir / "daemon.lock"

    @property
    def info(self) -> Path:
        return self.state_dir / "daemon.json"

    @property
    def socket_dir(self) -> Path:
        if len(str(self.state_dir / "workers.ipc")) <= IPC_PATH_MAX:
            return self.state_dir
        digest = hashlib.sha1(str(self.home).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"dallm-{os.getuid()}-{digest}"

    def endpoint(self, name: str) -> str:
        return f"ipc://{self.socket_dir / (name + '.ipc')}"

    def prepare(self) -> None:
        """Create the home, run and jobs folders, all 0700; UnsafeFolder (one line) when one is a
        symlink, someone else's, or writable by others (a squatted /tmp socket folder is never
        taken over: files in it may be someone else's)."""
        make_private_dir(self.home, "home")
        make_private_dir(self.state_dir, "run folder")
        make_private_dir(self.socket_dir, "socket folder", repair=self.socket_dir == self.state_dir)
        make_private_dir(self.jobs, "jobs folder")

    def read_info(self) -> dict | None:
        try:
            return json.loads(self.info.read_text())
        except (OSError, ValueError):
            return None


class LockHeld(RuntimeError):
    pass


class DaemonLock:
    """An exclusive flock on <home>/run/daemon.lock for the life of the daemon; released by the
    kernel when the process dies (kill -9 included), so a stale pidfile never blocks a restart."""

    def __init__(self, paths: DaemonPaths) -> None:
        self.paths = paths
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            info = self.paths.read_info() or {}
            raise LockHeld(
                f"a daemon already runs on {self.paths.home} (pid {info.get('pid', '?')})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def lock_is_held(paths: DaemonPaths) -> bool:
    """True when some process holds the daemon lock of this home."""
    try:
        fd = os.open(paths.lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def write_info(paths: DaemonPaths, data: dict) -> None:
    tmp = paths.info.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.chmod(tmp, 0o600)
    tmp.replace(paths.info)
