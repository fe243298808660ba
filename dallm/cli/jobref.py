"""A JOB argument of `dallm export` and `dallm report`: an output folder, or a daemon job id or name.

A name picks the newest job of that name that *finished* (finished or stopped-early), saying so on
stderr when newer ones (failed, cancelled, still running) were passed over; with none finished, the
newest job of that name. An id is taken as given.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dallm.cli import CommandError

if TYPE_CHECKING:
    from dallm.protocol import JobSummary

DONE = ("finished", "stopped", "stopped-early")
EXIT_UNAVAILABLE = 3


def looks_like_folder(ref: str) -> bool:
    return "/" in ref or Path(ref).suffix != "" or ref in (".", "..")


def job_folder(ref: str, home: str | None, connect: str | None) -> Path:
    """The output folder of the daemon's job `ref` (an id, or a name: its newest finished job)."""
    return job_and_folder(ref, home, connect)[1]


def job_and_folder(ref: str, home: str | None, connect: str | None) -> tuple[JobSummary, Path]:
    """The daemon's job `ref` (an id, or a name: its newest finished job) and its output folder."""
    from dallm.client.client import DaemonClient, DaemonError, DaemonUnavailable

    try:
        with DaemonClient(connect, home=home) as c:
            if ref.isdigit():
                job = c.summary(ref)
            else:
                named = sorted((j for j in c.jobs() if j.name == ref), key=lambda j: j.id, reverse=True)
                if not named:
                    raise DaemonError("not_found", f"no job {ref!r}")
                done = [j for j in named if j.state in DONE]
                job = done[0] if done else named[0]
                newer = [j for j in named if j.id > job.id]
                if newer:
                    skipped = ", ".join(f"job {j.id} {j.state}" for j in newer)
                    print(f"{ref}: job {job.id} ({job.state}), the newest finished; newer: {skipped}",
                          file=sys.stderr)  # fmt: skip
    except DaemonUnavailable as e:
        raise CommandError(f"{ref}: not a folder, and {e}", EXIT_UNAVAILABLE) from None
    except DaemonError as e:
        raise CommandError(f"{ref}: not a folder, and {e}") from None
    if not job.out_dir or not Path(job.out_dir).is_dir():
        raise CommandError(f"job {job.id} ({job.state}) has no output folder yet")
    return job, Path(job.out_dir)


def resolve(ref: str, home: str | None, connect: str | None) -> Path:
    """`ref` as a folder when it is one, else as a daemon job."""
    return resolve_job(ref, home, connect)[1]


def resolve_job(ref: str, home: str | None, connect: str | None) -> tuple[JobSummary | None, Path]:
    """`ref` as a folder when it is one (no job), else as a daemon job with its folder."""
    path = Path(ref)
    if path.is_dir():
        return None, path
    if looks_like_folder(ref):
        raise CommandError(f"{path}: no such job folder")
    return job_and_folder(ref, home, connect)
