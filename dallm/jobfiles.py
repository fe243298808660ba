"""Files in a job's output folder, opened so that another local user cannot redirect them (issue 25).

An output folder may lie in a folder others can write in (a shared `--allow` folder, mode 1777).
Whoever could write in the job folder itself could plant a symlink there (`worker.log` ->
/etc/shadow, `metrics.jsonl` -> a root-owned file) and have the daemon, or a worker running as the
daemon's user, read or overwrite its target. So:
- a job folder is ours (owned by the effective uid), a real folder, and no one else may write in it
  (no group/other write bit); each folder from the allowed root down to it is ours or root's, and
  not writable by others unless it is sticky (then no one else can rename what is ours in it). `make_job_folder` creates what is missing 0700 and refuses (UnsafeJobFolder, one
  line naming the folder) what is not so;
- every file in it is opened with `open_in`: through the folder's descriptor (checked again), with
  O_NOFOLLOW (a link is refused, never followed), created 0600.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeJobFolder(RuntimeError):
    """A job folder (or a folder above it) that another user owns or could write in; one line."""


def mode_problem(st: os.stat_result, above: bool = False) -> str | None:
    """Why a folder with this stat is not ours alone, or None. above: a folder on the way to a job
    folder, which root may own and others may write in when it is sticky (they cannot rename what
    is ours in it)."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if st.st_uid != os.geteuid() and not (above and st.st_uid == 0):
        return f"is owned by uid {st.st_uid}, not by the daemon's user (uid {os.geteuid()})"
    loose = st.st_mode & 0o022
    if loose and not (above and st.st_mode & stat.S_ISVTX):
        return f"has mode {stat.S_IMODE(st.st_mode):04o} (others may write in it)"
    return None


def job_folder_problem(path: Path, above: bool = False) -> str | None:
    """Why the existing folder `path` may not be a job folder (above: lie on the way to one), or
    None (it does not exist: None)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot be inspected ({e.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    return mode_problem(st, above)


def _refuse(path: Path, problem: str) -> UnsafeJobFolder:
    return UnsafeJobFolder(f"output folder {path} {problem}; refusing to use it")


def make_job_folder(path: Path, roots: tuple[Path, ...] = ()) -> Path:
    """Create `path` (0700, each missing folder below its root too) or accept it when it is safe
    (see the module's doc); UnsafeJobFolder otherwise. `roots`: the folders jobs may use; the
    deepest one holding `path` is its root (none: `path` alone is checked, its parents created)."""
    root = max(
        (r for r in roots if path.is_relative_to(r) and path != r), key=lambda r: len(r.parts), default=None
    )
    if root is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        chain = [path]
    else:
        parts = path.relative_to(root).parts
        chain = [root.joinpath(*parts[: i + 1]) for i in range(len(parts))]
        try:
            st = os.stat(root)
        except OSError as e:
            raise _refuse(path, f"lies in {root}, which cannot be inspected ({e.strerror})") from None
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise _refuse(path, f"lies in {root}, which others may write in without the sticky bit")
    for folder in chain:
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        problem = job_folder_problem(folder, above=folder != path)
        if problem:
            raise _refuse(path, problem if folder == path else f"lies in {folder}, which {problem}")
    return path


def open_in(folder: Path, name: str, flags: int, mode: int = 0o600) -> int:
    """A descriptor of `folder`/`name`: the folder checked (ours, no one else writes in it, not a
    link) through its own descriptor, the file opened without following a link (OSError ELOOP) and
    created `mode`. A file someone else owns is refused (PermissionError)."""
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"{name!r} is not a file name")
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW)
    try:
        problem = mode_problem(os.fstat(dfd))
        if problem:
            raise _refuse(folder, problem)
        fd = os.open(name, flags | NOFOLLOW, mode, dir_fd=dfd)
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise PermissionError(f"{folder / name} is not a file of the daemon's user; refusing to use it")
    return fd


def write_file(folder: Path, name: str, data: bytes) -> Path:
    """Replace the content of `folder`/`name` (created 0600)."""
    fd = open_in(folder, name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return folder / name


def append_fd(folder: Path, name: str) -> int:
    """A descriptor that appends to `folder`/`name` (created 0600), for a log."""
    return open_in(folder, name, os.O_WRONLY | os.O_APPEND | os.O_CREAT)


def read_fd(folder: Path, name: str) -> int:
    return open_in(folder, name, os.O_RDONLY)
