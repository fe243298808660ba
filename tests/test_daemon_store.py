"""Store, scheduler rules, paths and lock: no sockets, no processes."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from dallm.client.home import DaemonLock, DaemonPaths, LockHeld, lock_is_held
from dallm.daemon.executors.local import LocalHandle, detect_devices, make_slots
from dallm.daemon.scheduler import WorkerProc, outcome
from dallm.daemon.store import ADDED_COLUMNS, SCHEMA, Store
from dallm.protocol import JobResult, WorkerError


def test_queue_order_priorities_then_fifo(tmp_path: Path) -> None:
    s = Store(tmp_path / "d.db")
    ids = [s.add_job(f"j{i}", {}, prio, 10, 0) for i, prio in enumerate([0, 5, 0, 5, -1])]
    order = []
    while (job := s.next_queued()) is not None:
        order.append(job)
        s.transition(job, "running", "test")
    assert order == [ids[1], ids[3], ids[0], ids[2], ids[4]]
    assert [t.to_state for t in s.transitions(ids[0])] == ["queued", "running"]
    assert s.counts() == {"running": 5}


def test_store_of_an_older_daemon_gets_the_new_columns(tmp_path: Path) -> None:
    """A store written before the phase/ETA columns existed opens, lists and takes the new fields."""
    path = tmp_path / "old.db"
    jobs, rest = SCHEMA.split("CREATE INDEX IF NOT EXISTS jobs_queue")  # the events table has a "kind" too
    for column, kind in ADDED_COLUMNS.items():
        jobs = jobs.replace(f",\n    {column} {kind}", "")
    old = jobs + "CREATE INDEX IF NOT EXISTS jobs_queue" + rest
    assert "phase" not in old.split("CREATE TABLE IF NOT EXISTS transitions")[0]
    db = sqlite3.connect(path)
    db.executescript(old)
    db.execute(
        "INSERT INTO jobs (name, config, state, created, updated) VALUES ('old', '{}', 'running', 1, 1)"
    )
    db.commit()
    db.close()
    s = Store(path)
    assert s.summary(1).phase == "" and s.summary(1).eval_stop_seconds is None
    s.update_job(1, phase="kid", phase_since=5.0, eval_every=20, samples_every=0, eval_stop_seconds=3.5)
    row = s.summary(1)
    assert (row.phase, row.phase_since, row.eval_every, row.eval_stop_seconds) == ("kid", 5.0, 20, 3.5)


def test_supersede_marks_only_later_steps(tmp_path: Path) -> None:
    s = Store(tmp_path / "d.db")
    job = s.add_job("a", {}, 0, 10, 0)
    rows = [(i, i - 1, job, "job/1/", "metrics", i, float(i), f'{{"kind":"metrics","step":{i},"values":{{}}}}', None)
            for i in range(1, 11)]  # fmt: skip
    s.add_events(rows, {job: {"step": 10}})
    assert s.supersede(job, 6, 11) == 4
    assert s.metric_steps(job) == [1, 2, 3, 4, 5, 6]
    assert s.metric_steps(job, include_superseded=True) == list(range(1, 11))
    assert s.head() == 10 and s.topic_heads() == {"job/1/": 10}


def test_listing_500_jobs(tmp_path: Path) -> None:
    # No wall-clock limit here: speed belongs in bench/ (a 0.2 s limit failed at load 5).
    s = Store(tmp_path / "d.db")
    cfg = {"name": "x", "train": {"steps": 10}, "data": {"dir": "/d"}, "lora": {"targets": ["to_q"] * 20}}
    for i in range(500):
        s.add_job(f"j{i}", cfg, i % 3, 10, 0)
    jobs = s.list_jobs()
    assert len(jobs) == 500
    assert [j.id for j in s.list_jobs(limit=3)] == [498, 499, 500]
    assert len(s.list_jobs(states=["queued"])) == 500


def _worker(**kw) -> WorkerProc:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    handle = LocalHandle(proc)
    handle.lost = kw.pop("lost", None)
    return WorkerProc(
        job=1, attempt=kw.pop("attempt", 1), slot=0, device="cpu", proc=handle, identity=b"1.1", **kw
    )


def test_outcomes() -> None:
    done = JobResult(out_dir="o", final_step=9, result_step=5, reason="stopped")
    assert outcome(_worker(done=done), False, 0)[0] == "stopped"  # the user stopped it
    for reason, state in (("rolled_back", "stopped"), ("early_stop", "stopped-early")):
        assert outcome(_worker(done=done.model_copy(update={"reason": reason})), False, 0)[0] == state
    done = done.model_copy(update={"reason": "completed"})
    assert outcome(_worker(done=done), False, 0)[:2] == ("finished", "completed 9 steps")
    done = done.model_copy(update={"reason": "interrupted"})
    assert outcome(_worker(done=done), True, 0)[0::2] == ("queued", True)
    err = WorkerError(category="nan", message="NaN loss: FloatingPointError: loss is nan at step 3")
    assert outcome(_worker(error=err), False, 3)[:2] == ("failed", err.message)
    assert outcome(_worker(), False, 0)[0] == "failed"  # died without a word
    assert outcome(_worker(attempt=1), False, 1)[0::2] == ("queued", True)  # retried
    assert outcome(_worker(cancel=True), False, 1)[0] == "cancelled"
    # A worker whose machine went away (a Ray node) is queued again without using up a retry.
    state, reason, resume = outcome(_worker(lost="its Ray node was lost"), False, 0)
    assert (state, resume) == ("queued", True) and reason.startswith("its Ray node was lost at step 0")


def test_slots_and_devices() -> None:
    assert make_slots(["cpu"], None) == ["cpu"]
    assert make_slots(["cpu"], 3) == ["cpu", "cpu", "cpu"]
    assert make_slots(["0", "1", "2"], 2) == ["0", "1"]
    assert detect_devices("0,1") == ["0", "1"] and detect_devices("cpu") == ["cpu"]
    with pytest.raises(ValueError):
        detect_devices("gpu0")


def test_lock_keeps_a_second_daemon_out(tmp_path: Path) -> None:
    paths = DaemonPaths(tmp_path / "h")
    paths.prepare()
    assert (paths.home.stat().st_mode & 0o777) == 0o700 and (paths.state_dir.stat().st_mode & 0o777) == 0o700
    first = DaemonLock(paths)
    first.acquire()
    assert lock_is_held(paths)
    with pytest.raises(LockHeld):
        DaemonLock(paths).acquire()
    first.release()
    assert not lock_is_held(paths)


def test_long_homes_get_short_socket_paths(tmp_path: Path) -> None:
    paths = DaemonPaths(tmp_path / ("x" * 120))
    assert len(paths.endpoint("workers")) < 108 and paths.socket_dir != paths.state_dir


def test_worker_errors_are_classified() -> None:
    import errno

    from dallm.daemon.worker import classify

    assert classify(FloatingPointError("loss is nan at step 3")).category == "nan"
    assert classify(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")).category == "oom"
    assert classify(OSError(errno.ENOSPC, "No space left on device")).category == "disk_full"
    assert (
        classify(
            RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        ).category
        == "disk_full"
    )
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as e:
            raise RuntimeError("checkpoint failed") from e
    except RuntimeError as e:
        assert classify(e).category == "disk_full"
    err = classify(ValueError("bad\nsecond line"))
    assert err.category == "error" and err.message == "ValueError: bad"


def test_worker_leaves_out_values_json_cannot_carry(tmp_path: Path) -> None:
    import zmq

    from dallm.daemon.worker import WorkerLink
    from dallm.protocol import MetricsEvent

    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    endpoint = f"ipc://{tmp_path}/w.ipc"
    router.bind(endpoint)
    link = WorkerLink(endpoint, 1, 1)
    link.emit(MetricsEvent(step=3, values={"loss": float("nan"), "lr": 1e-4, "grad_norm": float("inf")}))
    frames = [router.recv_multipart() for _ in range(2)][1]
    assert frames[1] == b"ev" and MetricsEvent.model_validate_json(frames[3]).values == {"lr": 1e-4}
    link.sock.close(0)
    router.close(0)
