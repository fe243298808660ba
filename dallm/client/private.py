"""Private folders: owned by us, not a symlink, no access for group or others.

The daemon keeps its sockets, pidfile and keys in such folders; whoever can write in one could swap
a socket or a key. `make_private_dir` is used by the daemon at every start: it creates one, repairs a
folder of ours that only we could have written in, and refuses (repair=False) a folder it must not
repair (a squatted /tmp socket folder); a client checks the socket folder with `folder_problem` before
it connects (dallm/client/client.py).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path


class UnsafeFolder(RuntimeError):
    """A folder that someone else owns or could write in; the message is one line."""


def folder_problem(path: Path, strict: bool = True) -> str | None:
    """Why `path` is not a private folder of ours, or None. strict: no group/other bits at all;
    else only group/other *write* bits count (nobody else could have put anything in it)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"cannot be inspected ({e.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by us (uid {os.geteuid()})"
    loose = st.st_mode & (0o077 if strict else 0o022)
    if loose:
        return f"has mode {stat.S_IMODE(st.st_mode):04o} (others may use it; expected 0700)"
    return None


def make_private_dir(path: Path, what: str = "folder", repair: bool = True) -> Path:
    """Create `path` (0700, parents as needed) or accept it if it is ours and private.

    repair: a folder of ours that nobody else could write in (say 0755) is set to 0700; a folder
    others own or could write in, or a symlink, is refused (UnsafeFolder): files in it may be theirs.
    """
    with contextlib.suppress(FileExistsError):
        path.mkdir(parents=True, mode=0o700)
    problem = folder_problem(path, strict=not repair)
    if problem:
        raise UnsafeFolder(f"{what} {path} {problem}; refusing to use it")
    if repair:
        os.chmod(path, 0o700)
    return path
