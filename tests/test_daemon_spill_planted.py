# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""Issue 25: a spill file someone else planted is never replayed: only one the daemon's user wrote
(ours, 0600, in a folder of ours no one else may write in) is adopted, and a line may carry events
and progress columns of its own job only, never state, out_dir, name or reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import config, daemons, ended_then_killed, home, wait_state  # noqa: F401

from dallm.daemon.spill import SPILL_FILE, Spill, append_line, encode_line
from dallm.daemon.store import EventRow
from dallm.protocol import LogEvent, job_topic

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _forged(job: int, seq: int, updates: dict[str, Any]) -> bytes:
    row = (seq, 0, job, job_topic(job), "log", None, time.time(),
           LogEvent(level="info", message="forged").model_dump_json(), None)  # fmt: skip
    return encode_line(99, job, [row], updates)


def _adopted(path: Path) -> list[int]:
    """The seqs a fresh Spill replays from `path` (job 1's file)."""
    sp = Spill()
    sp.adopt({1: path}, committed=0)
    written: list[int] = []

    def commit(rows: list[EventRow], upd: dict[int, dict[str, Any]]) -> None:
        written.extend(r[0] for r in rows)

    sp.drain(commit, lambda job, note: None, lambda frames: None)
    return written


@pytest.mark.parametrize(
    "updates", [{"state": "queued"}, {"out_dir": "/elsewhere"}, {"name": "x"}, {"reason": "forged"}]
)
def test_a_spill_line_never_sets_what_the_daemon_derives(tmp_path: Path, updates: dict[str, Any]) -> None:
    path = tmp_path / SPILL_FILE
    append_line(path, _forged(1, 1, updates))
    append_line(path, _forged(1, 2, {"step": 3}))
    assert _adopted(path) == [2]


def test_a_spill_file_not_written_as_the_daemon_writes_it_is_not_replayed(tmp_path: Path) -> None:
    path = tmp_path / SPILL_FILE
    append_line(path, _forged(1, 1, {}))
    os.chmod(path, 0o644)
    assert _adopted(path) == []  # 0644: not the daemon's own 0600 file
    os.chmod(path, 0o600)
    link = tmp_path / "job" / SPILL_FILE
    link.parent.mkdir()
    link.symlink_to(path)
    assert _adopted(link) == []  # a link is never followed
    os.chmod(tmp_path, 0o777)
    try:
        assert _adopted(path) == []  # a folder others may write in
    finally:
        os.chmod(tmp_path, 0o700)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_a_planted_spill_file_is_not_replayed_at_restart(daemons, home: Path) -> None:
    job, out, head = ended_then_killed(daemons(), 3)
    # The folder as a daemon before issue 25 accepted it: nobody's, open to all; nobody's spill file.
    os.chmod(home.parent, 0o755)
    os.chmod(home, 0o755)
    os.chmod(home / "jobs", 0o755)
    os.chown(out, 65534, 65534)
    os.chmod(out, 0o777)
    elsewhere = home.parent / "outside"
    line = _forged(job, head + 1, {"state": "queued", "out_dir": str(elsewhere)}).decode()
    subprocess.run([*NOBODY, "tee", str(out / SPILL_FILE)], input=line, text=True, check=True, cwd="/",
                   stdout=subprocess.DEVNULL)  # fmt: skip
    d2 = daemons()
    with d2.client() as c:
        time.sleep(0.5)
        assert c.summary(job).state == "finished"
        assert not [x for x in c.logs(job).lines if x.message == "forged"]
    assert not elsewhere.exists() and (out / SPILL_FILE).exists()  # left there, for its owner to see
    assert "not replayed" in d2.log_text()
