# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""Store writes that fail (a full disk, a locked database) drop no event: batches wait in the spill and
are written in order once the store works; control requests meanwhile get `unavailable`; beyond the
memory bound they go to the job folder and come back in order; only a batch neither can take marks the
job's history incomplete; a restart restores checkpoint events from the job folder."""

from __future__ import annotations

import errno
import json
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import FAKE, config, daemons, home, metric_steps, wait_state, wait_step  # noqa: F401

from dallm.client.client import DaemonClient, DaemonError
from dallm.daemon import spill as spill_module
from dallm.daemon.server import Daemon
from dallm.daemon.spill import SPILL_FILE, Spill, append_line, encode_line
from dallm.daemon.store import EventRow
from dallm.protocol import TERMINAL_STATES, JobSummary, job_topic


@pytest.fixture
def inproc(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Daemon, dict[str, bool]]]:
    """A daemon in a thread whose store raises "database or disk is full" while fault["on"]."""
    monkeypatch.setenv("DALLM_FAKE_STEP_S", "0.02")
    d = Daemon(home, ["cpu"], runner=FAKE, allow=(Path(tempfile.gettempdir()),))
    fault = {"on": False}
    real = d.store.add_events

    def add_events(rows: Any, updates: Any = None) -> None:
        if fault["on"]:
            raise sqlite3.OperationalError("database or disk is full")
        real(rows, updates)

    monkeypatch.setattr(d.store, "add_events", add_events)
    t = threading.Thread(target=d.run, daemon=True)
    t.start()
    yield d, fault
    fault["on"] = False
    d.begin_shutdown()
    t.join(30)


def _outage(c: DaemonClient, d: Daemon, fault: dict[str, bool], job: int, until: Any) -> DaemonError:
    """Make the store fail from step 10 until `until(spill)` holds; returns the refusal a request got."""
    wait_step(c, job, 10)
    fault["on"] = True
    end = time.monotonic() + 20
    while not until(d.events.spill) and time.monotonic() < end:
        time.sleep(0.02)
    assert until(d.events.spill), "the outage did not reach its mark"
    with pytest.raises(DaemonError) as refused:
        c.summary(job)
    fault["on"] = False
    return refused.value


def _wait_end(c: DaemonClient, job: int) -> JobSummary:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        try:
            return wait_state(c, job, set(TERMINAL_STATES))
        except DaemonError as e:  # the spill may still be draining
            assert e.code == "unavailable"
            time.sleep(0.05)
    raise AssertionError(f"job {job} did not end")


def test_failed_store_writes_are_held_and_written_in_order(inproc, home: Path) -> None:
    d, fault = inproc
    with DaemonClient(home=home, timeout=10) as c:
        job = c.submit(config("spill", steps=80, every=10)).id
        refused = _outage(c, d, fault, job, lambda spill: spill.size > 1000)
        assert refused.code == "unavailable"
        assert "database or disk is full" in str(refused) and "held in memory" in str(refused)
        s = _wait_end(c, job)
        assert s.state == "finished", s.reason
        assert s.history_gap is None and "history incomplete" not in s.reason
        # every step and checkpoint, in seq order, none twice
        assert metric_steps(c, job) == list(range(1, 81))
        assert [x.step for x in c.show(job).checkpoints] == list(range(10, 81, 10))


def test_spill_overflow_goes_to_the_job_folder_and_back_in_order(inproc, home: Path) -> None:
    d, fault = inproc
    d.events.spill.max_bytes = 2000  # a few metric events: the outage overflows memory
    seen: list[Path] = []
    with DaemonClient(home=home, timeout=10) as c:
        job = c.submit(config("disk", steps=80, every=10)).id
        out = Path(c.summary(job).out_dir)
        spilled = out / SPILL_FILE

        def on_disk(spill: Spill) -> bool:
            if spilled.exists() and spilled.stat().st_size > 2000:
                seen.append(spilled)
            return bool(seen)

        refused = _outage(c, d, fault, job, on_disk)
        assert refused.code == "unavailable" and "in the job folder" in str(refused)
        assert spilled.stat().st_mode & 0o077 == 0  # the job owner's events: 0600
        s = _wait_end(c, job)
        assert s.state == "finished", s.reason
        assert s.history_gap is None and "history incomplete" not in s.reason
        assert metric_steps(c, job) == list(range(1, 81))  # in seq order, none twice, none lost
        assert [x.step for x in c.show(job).checkpoints] == list(range(10, 81, 10))
        assert not spilled.exists()  # deleted once replayed


def test_spill_overflow_marks_the_history_incomplete(inproc, home: Path, capsys, monkeypatch) -> None:
    """Only what neither memory nor the job folder can take is lost, and then said."""
    d, fault = inproc
    d.events.spill.max_bytes = 2000

    def full(path: Path, line: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spill_module, "append_line", full)
    with DaemonClient(home=home, timeout=10) as c:
        job = c.submit(config("hole", steps=80, every=10)).id
        refused = _outage(c, d, fault, job, lambda spill: bool(spill.lost))
        assert refused.code == "unavailable" and "dropped" in str(refused)
        s = _wait_end(c, job)
        assert s.history_gap is not None and "lost while the store could not be written" in s.history_gap
        assert "history incomplete" in s.reason  # never "finished" as if whole
        steps = metric_steps(c, job)
        assert steps == sorted(steps) and len(steps) < 80
    from dallm.cli import main

    assert main(["show", str(job), "--home", str(home)]) == 0
    assert "history incomplete:" in capsys.readouterr().out


def _rows(job: int, seqs: range) -> list[EventRow]:
    return [(q, q - 1, job, job_topic(job), "metrics", q, float(q), json.dumps({"x": q}), None) for q in seqs]


def test_spill_files_replay_in_seq_order_across_jobs_and_resume_after_a_cut(tmp_path: Path) -> None:
    folders = {1: tmp_path / "a", 2: tmp_path / "b"}
    for f in folders.values():
        f.mkdir()
    sp = Spill(max_bytes=30, folder_of=folders.get)
    sp.push(_rows(1, range(1, 3)), {1: {"step": 2}}, [[b"m"]])  # memory
    sp.push(_rows(1, range(3, 5)) + _rows(2, range(5, 6)), {1: {"step": 4}}, [[b"x"]])  # disk from here
    sp.push(_rows(2, range(6, 7)), {}, [[b"y"]])  # fits in memory, but goes after the files: to disk
    sp.push([(7, 0, 2, job_topic(2), "sample", 7, 7.0, "{}", b"\x89PNG")], {}, [])
    assert len(sp) == 7 and (folders[1] / SPILL_FILE).exists() and (folders[2] / SPILL_FILE).exists()
    written: list[int] = []
    updates: list[dict[int, dict[str, Any]]] = []
    fail_at = {5}

    def commit(rows: list[EventRow], upd: dict[int, dict[str, Any]]) -> None:
        if any(r[0] in fail_at for r in rows):
            raise sqlite3.OperationalError("database or disk is full")
        written.extend(r[0] for r in rows)
        updates.append(upd)
        assert rows[-1][0] != 7 or rows[-1][8] == b"\x89PNG"  # blobs come back as they went

    published: list[list[list[bytes]]] = []
    sp.drain(commit, lambda job, note: None, published.append)
    assert written == [1, 2, 3, 4] and sp  # cut at seq 5: the rest waits
    fail_at.clear()
    sp.drain(commit, lambda job, note: None, published.append)
    assert written == [1, 2, 3, 4, 5, 6, 7]  # in order, none twice
    assert {1: {"step": 4}} in updates
    assert not sp and not any((f / SPILL_FILE).exists() for f in folders.values())
    assert published[0] == [[b"m"]] and len(published) == 5  # the memory batch, then one per line


def test_restart_restores_checkpoint_events_from_the_job_folder(daemons, home: Path) -> None:
    d = daemons(step_s=0.03)
    with d.client() as c:
        job = c.submit(config("a", steps=60, every=10)).id
        wait_step(c, job, 35)
    d.kill9()
    db = sqlite3.connect(home / "dallm.db")  # as if the dying daemon had not committed them
    db.execute("DELETE FROM events WHERE kind = 'checkpoint' AND step IN (10, 20)")
    db.commit()
    db.close()
    d2 = daemons(step_s=0.01)
    with d2.client() as c:
        s = wait_state(c, job, set(TERMINAL_STATES))
        assert s.state == "finished", s.reason
        kept = sorted(x.step for x in c.show(job).checkpoints if not x.superseded)
        assert kept == list(range(10, 61, 10))
        assert any("checkpoint event(s) up to" in line.message for line in c.logs(job).lines)


def test_a_start_during_an_outage_waits_for_the_store(inproc, home: Path, monkeypatch) -> None:
    """`started` supersedes history (a store write of its own): while the store fails it waits, and
    every later worker message with it, unread; then all of them go in, in order."""
    d, fault = inproc
    real_supersede, real_on_worker = d.store.supersede, d.worker_messages._on_worker

    def supersede(*args: Any) -> int:
        if fault["on"]:
            raise sqlite3.OperationalError("database or disk is full")
        return real_supersede(*args)

    def on_worker(frames: list[bytes]) -> None:
        if len(frames) > 3 and b'"kind":"started"' in frames[3] and not fault.get("tripped"):
            fault["on"] = fault["tripped"] = True  # the disk fills as the job starts
        real_on_worker(frames)

    monkeypatch.setattr(d.store, "supersede", supersede)
    monkeypatch.setattr(d.worker_messages, "_on_worker", on_worker)
    with DaemonClient(home=home, timeout=10) as c:
        job = c.submit(config("late", steps=30, every=10)).id
        end = time.monotonic() + 20
        while not fault.get("tripped") and time.monotonic() < end:
            time.sleep(0.02)
        assert fault.get("tripped"), "the job did not start"
        time.sleep(0.5)  # the worker trains on; its messages queue up unread
        fault["on"] = False
        s = _wait_end(c, job)
        assert s.state == "finished" and s.total_steps == 30, s.reason
        events, _ = c.history_all(0, [job_topic(job)], kinds=["started"])
        assert len(events) == 1
        assert metric_steps(c, job) == list(range(1, 31))


def test_a_spill_line_of_another_job_or_column_is_refused(tmp_path: Path) -> None:
    """The file lies in a job folder: a line for another job, or setting a column no batch sets,
    never reaches the store; it counts as lost."""
    path = tmp_path / SPILL_FILE
    append_line(path, encode_line(1, 2, _rows(2, range(1, 2)), {}))  # job 2's event in job 1's file
    append_line(path, encode_line(2, 1, _rows(1, range(2, 3)), {"config": "{}"}))
    append_line(path, encode_line(3, 1, _rows(1, range(3, 4)), {"step": 3}))
    sp = Spill()
    assert sp.adopt({1: path}, committed=0) == (3, {job_topic(1): 3})
    written: list[int] = []
    gaps: dict[int, str] = {}
    full = [True]

    def commit(rows: list[EventRow], upd: dict[int, dict[str, Any]]) -> None:
        if full.pop():
            raise sqlite3.OperationalError("database or disk is full")
        written.extend(r[0] for r in rows)

    sp.drain(commit, gaps.__setitem__, lambda frames: None)  # cut: the file is read again next time
    full.append(False)
    sp.drain(commit, gaps.__setitem__, lambda frames: None)
    assert written == [3] and gaps[1].startswith("2 event(s) lost") and not path.exists()
