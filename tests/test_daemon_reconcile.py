# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""Issue 13: on recovery the daemon reconciles every kind of event from the job folder (metrics,
checkpoints, sample grids, the turning point, the job's end): a job whose worker finished while the
daemon was down ends with its result instead of running again (daemon/reconcile.py)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path

from daemon_helpers import config, daemons, ended_then_killed, home, metric_steps, wait_state, wait_step  # noqa: F401

from dallm.daemon.reconcile import sample_grids
from dallm.daemon.spill import SPILL_FILE, append_line, encode_line
from dallm.protocol import (
    QUEUE_TOPIC,
    TERMINAL_STATES,
    FinishedEvent,
    LogEvent,
    SampleEvent,
    TurningPointEvent,
    job_topic,
)
from dallm.testing.fake_engine import tiny_png


def _wait_file(path: Path, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} was not written"
        time.sleep(0.05)


def test_a_job_that_finished_while_the_daemon_was_down_ends_with_its_result(daemons, home: Path) -> None:
    d = daemons(step_s=0.03)
    with d.client() as c:
        job = c.submit(
            config("fin-tp.12", steps=40, every=10, samples={"every": 10, "prompts": ["a red circle"]})
        ).id
        out = Path(wait_step(c, job, 3).out_dir)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGSTOP)  # frozen: the worker trains on, nothing it sends is committed
    try:
        _wait_file(out / "result.json")
        # The grids the engine writes beside its events (the fake engine only sends the events).
        for step in (10, 20, 30, 40):
            (out / "samples").mkdir(exist_ok=True)
            (out / "samples" / f"step-{step}.png").write_bytes(tiny_png(16, 16))
    finally:
        d.kill9()  # its worker dies with it (or has ended): it cannot tell the daemon any more
    d2 = daemons(step_s=0.01)
    with d2.client() as c:
        s = c.summary(job)
        assert s.state == "finished", s.reason  # not queued to run again, not failed
        assert "while the daemon was down" in s.reason and s.attempts == 1
        assert (s.step, s.result_step, s.turning_point) == (40, 40, 12)
        assert metric_steps(c, job) == list(range(1, 41))  # committed ones, then the restored, in order
        assert [x.step for x in c.show(job).checkpoints if not x.superseded] == [10, 20, 30, 40]
        events, _ = c.history_all(0, [job_topic(job)])
        live = [e.event for e in events if not e.superseded]
        samples = [e for e in live if isinstance(e, SampleEvent)]
        assert [e.step for e in samples] == [10, 20, 30, 40]
        assert all(e.png.startswith(b"\x89PNG") and e.path == f"samples/step-{e.step}.png" for e in samples)
        assert [(e.step, e.seen_at) for e in live if isinstance(e, TurningPointEvent)] == [(12, 40)]
        assert [e.result_step for e in live if isinstance(e, FinishedEvent)] == [40]
        assert any("finished while the daemon was down" in line.message for line in c.logs(job).lines)


def test_an_earlier_runs_result_does_not_end_a_resumed_job(daemons, home: Path) -> None:
    """result.json older than the job's start (a job rolled back after it ended): it runs on."""
    d = daemons(step_s=0.03)
    with d.client() as c:
        job = c.submit(config("stale", steps=40, every=10)).id
        out = Path(wait_step(c, job, 15).out_dir)
    d.kill9()
    result = {"reason": "completed", "final_step": 7, "result_step": 7}
    (out / "result.json").write_text(json.dumps(result))
    past = time.time() - 3600
    os.utime(out / "result.json", (past, past))
    db = sqlite3.connect(home / "dallm.db")  # as if the dying daemon had not committed them
    db.execute("DELETE FROM events WHERE kind = 'sample' OR (kind = 'checkpoint' AND step = 10)")
    db.commit()
    db.close()
    (out / "samples").mkdir()
    (out / "samples" / "step-10.png").write_bytes(tiny_png(16, 16))
    d2 = daemons(step_s=0.01)
    with d2.client() as c:
        s = wait_state(c, job, set(TERMINAL_STATES))
        assert s.state == "finished" and s.reason == "completed 40 steps", s.reason
        assert s.attempts == 2
        events, _ = c.history_all(0, [job_topic(job)], kinds=["sample"])
        assert [e.event.step for e in events if not e.superseded] == [10]  # restored on the resume
        assert 10 in [x.step for x in c.show(job).checkpoints if not x.superseded]
        assert any("sample grid event(s) up to" in line.message for line in c.logs(job).lines)


def test_sample_grids_from_the_index_stay_inside_the_job_folder(tmp_path: Path) -> None:
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "step-000005.png").write_bytes(tiny_png())
    (tmp_path.parent / "secret.png").write_bytes(tiny_png())
    lines = [
        {"step": 5, "path": "samples/step-000005.png", "prompts": ["a red circle"]},
        {"step": 6, "path": "../secret.png", "prompts": []},  # outside the job folder
        {"step": 7, "path": "samples/step-000007.png", "prompts": []},  # not written
    ]
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 8, "pa'  # torn last line
    (samples / "index.jsonl").write_text(text)
    assert sample_grids(tmp_path) == {5: ("samples/step-000005.png", ["a red circle"])}


def test_a_spill_file_a_dead_daemon_left_is_replayed_first(daemons, home: Path) -> None:
    job, out, head = ended_then_killed(daemons(), 5)
    # What a daemon that died during a store outage left in the job folder: two batches.
    rows = [
        (head + i, 0, job, job_topic(job), "log", None, time.time(),
         LogEvent(level="warning", message=f"spilled {i}").model_dump_json(), None)
        for i in (1, 2)
    ]  # fmt: skip
    append_line(out / SPILL_FILE, encode_line(7, job, rows[:1], {}))
    append_line(out / SPILL_FILE, encode_line(8, job, rows[1:], {"step": 5}))
    d2 = daemons()
    with d2.client() as c:
        lines = [(x.seq, x.message) for x in c.logs(job).lines if x.message.startswith("spilled")]
        assert lines == [(head + 1, "spilled 1"), (head + 2, "spilled 2")]
        assert not (out / SPILL_FILE).exists()
        c.set_priority(job, 3)  # numbered after the replayed events, not on top of them
        assert c.history(since=head + 2, topics=[QUEUE_TOPIC]).events
