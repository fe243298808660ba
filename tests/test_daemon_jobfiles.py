# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""Issue 25: no write or read through a link planted in a shared folder. A job folder is the
daemon's user's, 0700, and every file in it is opened without following a link (dallm/jobfiles.py).
The attacker is `nobody` (setpriv) where the tests run as root; the rest runs as any user."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from daemon_helpers import config, daemons, home, wait_state  # noqa: F401

from dallm.client.client import DaemonError
from dallm.jobfiles import UnsafeJobFolder, make_job_folder, open_in, write_file

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
as_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv: the attacker is `nobody`",
)


def plant(folder: Path, links: dict[str, Path]) -> None:
    """As nobody: `folder` (nobody's, 0777) holding `links` (name -> target)."""
    script = f"mkdir -m 777 {folder}" + "".join(f" && ln -s {t} {folder / n}" for n, t in links.items())
    subprocess.run([*NOBODY, "sh", "-c", script], check=True, cwd="/")


@pytest.fixture
def shared(home: Path) -> Path:
    """A shared folder in an allowed root (the tests allow /tmp): 1777, like /tmp itself."""
    folder = home.parent / "shared"
    folder.mkdir(parents=True)
    os.chmod(home.parent, 0o755)
    os.chmod(folder, 0o1777)
    return folder


@pytest.fixture
def victims(home: Path) -> dict[str, Path]:
    """Files of the daemon's user that a planted link points at."""
    out = {}
    for name in ("job-config.json", "metrics.jsonl", "worker.log"):
        p = home.parent / f"victim-{name}"
        p.write_text(f"secret of {name}\n")
        os.chmod(p, 0o600)
        out[name] = p
    return out


@as_root
def test_someone_elses_output_folder_is_refused_at_submit(daemons, home: Path, shared: Path, victims) -> None:
    plant(shared / "exp1", victims)
    d = daemons()
    with d.client() as c, pytest.raises(DaemonError) as err:
        c.submit(config("tricked", steps=3) | {"output_dir": str(shared / "exp1")})
    assert err.value.code == "invalid_config"
    assert f"{shared / 'exp1'} is owned by uid 65534" in str(err.value) and "\n" not in str(err.value)
    assert all(p.read_text() == f"secret of {n}\n" for n, p in victims.items())


@as_root
def test_a_folder_planted_while_the_job_waits_fails_it_at_start(
    daemons, home: Path, shared: Path, victims
) -> None:
    d = daemons(step_s=0.05)
    with d.client() as c:
        first = c.submit(config("first", steps=10_000))
        wait_state(c, first.id, "running")
        second = c.submit(config("second", steps=3) | {"output_dir": str(shared / "exp2")})
        plant(shared / "exp2", victims)  # after the submit's check, before the start
        c.cancel(first.id)
        s = wait_state(c, second.id, {"failed", "finished"})
    assert s.state == "failed" and f"output folder {shared / 'exp2'} is owned by uid 65534" in (
        s.reason or ""
    )
    assert all(p.read_text() == f"secret of {n}\n" for n, p in victims.items())


def test_a_folder_others_may_write_in_is_refused(daemons, home: Path, shared: Path) -> None:
    loose = shared / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)
    d = daemons()
    with d.client() as c, pytest.raises(DaemonError) as err:
        c.submit(config("loose", steps=3) | {"output_dir": str(loose)})
    assert err.value.code == "invalid_config" and "others may write in it" in str(err.value)


def test_worker_log_does_not_follow_a_planted_link(daemons, home: Path, victims) -> None:
    d = daemons()
    with d.client() as c:
        job = c.submit(config("log", steps=2))
        wait_state(c, job.id, "finished")
        log = Path(job.out_dir) / "worker.log"
        log.unlink()
        log.symlink_to(victims["worker.log"])
        with pytest.raises(DaemonError) as err:
            c.worker_log(job.id)
    assert err.value.code == "conflict" and "secret" not in str(err.value)


def test_job_folders_are_made_private_and_links_are_never_followed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    out = make_job_folder(root / "a" / "b", (root,))
    assert stat.S_IMODE(out.stat().st_mode) == 0o700 and stat.S_IMODE(out.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(write_file(out, "job-config.json", b"{}").stat().st_mode) == 0o600
    (out / "metrics.jsonl").symlink_to(tmp_path / "target")
    with pytest.raises(OSError) as err:
        open_in(out, "metrics.jsonl", os.O_WRONLY | os.O_CREAT)
    assert err.value.errno == errno.ELOOP and not (tmp_path / "target").exists()
    os.chmod(root, 0o777)  # writable by others, not sticky: our folder in it could be swapped
    with pytest.raises(UnsafeJobFolder, match="without the sticky bit"):
        make_job_folder(root / "c", (root,))
    os.chmod(root, 0o1777)
    make_job_folder(root / "c", (root,))
    (root / "link").symlink_to(out)
    with pytest.raises(UnsafeJobFolder, match="is a symlink"):
        make_job_folder(root / "link", (root,))
