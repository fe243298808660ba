# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""Job semantics through a real daemon process with the fake engine: queue order, stop, rollback,
cancel, priorities, graceful daemon stop and resume, one daemon per home, and the `dallm` CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_images
from daemon_helpers import config, daemons, home, metric_steps, wait_state, wait_step  # noqa: F401

from dallm.cli import main as dallm_main
from dallm.client.client import DaemonError
from dallm.protocol import MetricsEvent, job_topic


def test_submit_runs_to_finished_with_history(daemons) -> None:
    d = daemons(step_s=0.005)
    with d.client() as c:
        job = c.submit(config("a", steps=20, every=5, samples={"every": 10, "prompts": ["a cat"]}))
        assert job.state in ("queued", "running") and job.out_dir.endswith(f"jobs/{job.id}-a")
        s = wait_state(c, job.id, "finished")
        assert s.step == 20 and s.result_step == 20 and s.reason == "completed 20 steps"
        detail = c.show(job.id)
        assert [t.to_state for t in detail.transitions] == ["queued", "running", "finished"]
        assert all(t.reason for t in detail.transitions)
        assert [k.step for k in detail.checkpoints] == [5, 10, 15, 20]
        assert metric_steps(c, job.id) == list(range(1, 21))
        events, head = c.history_all(0, [job_topic(job.id)], kinds=["sample"])
        assert [e.event.step for e in events] == [10, 20] and events[0].event.png.startswith(b"\x89PNG")
        assert (Path(s.out_dir) / "result.json").exists()


def test_priorities_then_fifo(daemons) -> None:
    d = daemons(step_s=0.01)
    with d.client() as c:
        first = c.submit(config("first", steps=30))
        wait_state(c, first.id, "running")
        low = c.submit(config("low", steps=2, every=1))
        high1 = c.submit(config("high1", steps=2, every=1), priority=5)
        high2 = c.submit(config("high2", steps=2, every=1), priority=5)
        for j in (first, low, high1, high2):
            wait_state(c, j.id, "finished")
        started = {j.id: c.show(j.id).transitions[1].t for j in (first, low, high1, high2)}
        assert sorted(started, key=started.get) == [first.id, high1.id, high2.id, low.id]


def test_stop_finishes_at_the_turning_point(daemons) -> None:
    # The daemon's part (the fake engine writes no weights; tests/test_train_control.py checks that
    # the real engine's result weights are the turning point's, bit for bit).
    d = daemons(step_s=0.02)
    with d.client() as c:
        job = c.submit(config("a-tp.4", steps=500, every=5))
        wait_step(c, job.id, 10)
        c.stop(job.id)
        s = wait_state(c, job.id, "stopped")
        assert s.result_step == 4 and s.turning_point == 4 and "result is step 4" in s.reason
        assert (s.phase, s.phase_since) == ("", None)  # an ended job is in no phase (it was "stopping")
        assert s.step >= 10  # it had trained past the turning point
        result = json.loads((Path(s.out_dir) / "result.json").read_text())
        assert (result["reason"], result["result_step"], result["turning_point"]) == ("stopped", 4, 4)
        with pytest.raises(DaemonError) as err:
            c.stop(job.id)
        assert err.value.code == "conflict"


def test_rollback_resume_marks_later_history_superseded(daemons) -> None:
    d = daemons(step_s=0.02)
    with d.client() as c:
        job = c.submit(config("a", steps=40, every=5))
        wait_step(c, job.id, 12)
        c.rollback(job.id, 5, resume=True)
        s = wait_state(c, job.id, "finished")
        assert s.step == 40
        assert metric_steps(c, job.id) == list(range(1, 41))  # the live history has no duplicates
        everything = metric_steps(c, job.id, include_superseded=True)
        assert len(everything) > 40 and everything[:5] == [1, 2, 3, 4, 5]
        # rollback of a finished job to a checkpoint, finishing there
        c.rollback(job.id, 20)
        s = wait_state(c, job.id, "stopped")
        assert s.result_step == 20 and s.reason == "rolled back to step 20"
        assert json.loads((Path(s.out_dir) / "result.json").read_text())["result_step"] == 20
        with pytest.raises(DaemonError) as err:
            c.rollback(job.id, 7)
        assert err.value.code == "not_found" and "have: 5, 10" in str(err.value)


def test_rollbacks_in_either_order_leave_no_hole_in_the_history(daemons) -> None:
    """Finish at 10 then resume from 20 (a checkpoint that rollback superseded); resume at 5, finish
    at 20, then resume from 30: the store and metrics.jsonl hold every step once, in order."""
    d = daemons(step_s=0.02)

    def roll(job: int, step: int, resume: bool, expect: list[int]) -> None:
        c.rollback(job, step, resume=resume)
        wait_state(c, job, "finished" if resume else "stopped")
        out = Path(c.summary(job).out_dir)
        on_disk = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert metric_steps(c, job) == on_disk == expect

    with d.client() as c:
        job = c.submit(config("a", steps=40, every=5)).id
        wait_state(c, job, "finished")
        roll(job, 10, False, list(range(1, 11)))
        roll(job, 20, True, list(range(1, 41)))
        job = c.submit(config("b", steps=40, every=5)).id
        wait_step(c, job, 12)
        roll(job, 5, True, list(range(1, 41)))
        roll(job, 20, False, list(range(1, 21)))
        roll(job, 30, True, list(range(1, 41)))


def test_checkpoint_now(daemons) -> None:
    d = daemons(step_s=0.02)
    with d.client() as c:
        job = c.submit(config("a", steps=1000, every=1000))
        wait_step(c, job.id, 7)
        c.checkpoint(job.id)
        end = time.monotonic() + 20
        while not c.show(job.id).checkpoints and time.monotonic() < end:
            time.sleep(0.05)
        assert c.show(job.id).checkpoints[0].step >= 7
        c.cancel(job.id)
        wait_state(c, job.id, "cancelled")
        with pytest.raises(DaemonError, match="not running"):
            c.checkpoint(job.id)


def test_cancel_queued_and_running(daemons) -> None:
    d = daemons(step_s=0.02)
    with d.client() as c:
        running = c.submit(config("r", steps=1000))
        queued = c.submit(config("q", steps=10))
        wait_step(c, running.id, 2)
        assert c.cancel(queued.id).state == "cancelled"
        c.cancel(running.id)
        assert wait_state(c, running.id, "cancelled").reason == "cancelled by user"
        with pytest.raises(DaemonError):
            c.cancel(running.id)
        assert c.ping().counts == {"cancelled": 2}


def test_graceful_daemon_stop_checkpoints_and_resumes(daemons) -> None:
    d = daemons(step_s=0.02)
    with d.client() as c:
        job = c.submit(config("a", steps=60, every=50))
        waiting = c.submit(config("b", steps=3))
        wait_step(c, job.id, 12)
    assert d.stop() == 0
    d2 = daemons(step_s=0.01)
    with d2.client() as c:
        s = c.summary(job.id)
        assert s.state in ("queued", "running")
        detail = c.show(job.id)
        interrupted = [t for t in detail.transitions if t.from_state == "running" and t.to_state == "queued"]
        assert interrupted and "daemon stopped" in interrupted[0].reason
        s = wait_state(c, job.id, "finished")
        assert "resuming" in c.show(job.id).transitions[-2].reason
        assert metric_steps(c, job.id) == list(range(1, 61))
        assert wait_state(c, waiting.id, "finished")


def test_one_daemon_per_home(daemons, home: Path) -> None:
    daemons()
    second = subprocess.run(
        [sys.executable, "-m", "dallm.daemon.cli", "start", "--foreground", "--home", str(home)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert second.returncode == 1 and "already runs" in second.stderr
    again = subprocess.run([sys.executable, "-m", "dallm.daemon.cli", "start", "--home", str(home)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert again.returncode == 0 and "already running" in again.stderr


def test_cli(daemons, home: Path, tmp_path: Path, capsys) -> None:
    daemons(step_s=0.005)
    cfg = tmp_path / "job.toml"
    write_images(tmp_path / "imgs", 2)
    cfg.write_text(
        'name = "cli"\n[data]\ndir = "imgs"\ninstance_prompt = "a red circle"\n[train]\nsteps = 10\n[monitor]\nwindow = 2\n'
    )
    base = ["--home", str(home)]
    assert dallm_main(["submit", str(cfg), "--set", "train.lr=-1", *base]) == 1
    assert "train.lr" in capsys.readouterr().err
    assert dallm_main(["ls", "--json", *base]) == 0
    assert json.loads(capsys.readouterr().out) == []  # nothing was queued
    assert dallm_main(["submit", str(cfg), "--wait", *base]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "1" and "finished" in out
    assert "job 1 finished      step 10/10" in err  # progress lines when stderr is no terminal
    assert dallm_main(["submit", str(cfg), "--set", "name=bad-nan.3", "--wait", *base]) == 1
    assert "NaN loss" in capsys.readouterr().err
    assert dallm_main(["ls", *base]) == 0
    table = capsys.readouterr().out
    assert "finished" in table and "failed" in table
    assert dallm_main(["show", "1", "--json", *base]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["state"] == "finished"
    assert dallm_main(["logs", "bad-nan.3", *base]) == 0
    assert "error" in capsys.readouterr().out
    assert dallm_main(["show", "nope", *base]) == 1
    assert "no job 'nope'" in capsys.readouterr().err
    assert dallm_main(["priority", "1", "3", *base]) == 0
    assert dallm_main(["ls", "--home", str(home / "elsewhere")]) == 3
    capsys.readouterr()
    assert dallm_main(["submit", str(cfg), "--set", "name=follow", "--set", "train.steps=60", *base]) == 0
    job_id = capsys.readouterr().out.strip()
    assert dallm_main(["logs", job_id, "-f", *base]) == 0  # returns when the job ends
    assert "finished: completed 60 steps" in capsys.readouterr().out
    # data paths in a config file are resolved against the file's folder before they are sent
    assert c_config(home, 1)["data"]["dir"] == str(tmp_path / "imgs")


def c_config(home: Path, job: int) -> dict:
    from dallm.client.client import DaemonClient

    with DaemonClient(home=home) as c:
        return c.show(job).config


def test_metrics_events_are_typed(daemons) -> None:
    d = daemons(step_s=0.0)
    with d.client() as c:
        job = c.submit(config("m", steps=5, every=5))
        wait_state(c, job.id, "finished")
        events, _ = c.history_all(0, [job_topic(job.id)])
        kinds = [e.event.kind for e in events]
        assert kinds[0] == "started" and kinds[-1] == "finished"
        assert all(isinstance(e.event, MetricsEvent) for e in events if e.event.kind == "metrics")


def test_daemon_cli_start_status_stop_in_the_background(home: Path) -> None:
    from dallm.client.home import DaemonPaths

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dallm.daemon.cli", *args, "--home", str(home)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    try:
        started = cli("start", "--devices", "cpu")
        assert started.returncode == 0 and "started" in started.stdout, started.stderr
        status = cli("status", "--json")
        assert status.returncode == 0 and json.loads(status.stdout)["slots"] == ["cpu"]
        stopped = cli("stop")
        assert stopped.returncode == 0 and "stopped" in stopped.stdout
        assert cli("status").returncode == 3
        assert cli("stop").returncode == 3
    finally:
        info = DaemonPaths(home).read_info()
        if info:
            with contextlib.suppress(OSError):
                os.kill(info["pid"], signal.SIGKILL)


def test_dallm_run_starts_a_daemon_submits_and_waits(home: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from dallm.client.home import DaemonPaths

    monkeypatch.setenv("DALLM_JOB_RUNNER", "dallm.testing.fake_engine:train")
    monkeypatch.setenv("DALLM_FAKE_STEP_S", "0.001")
    cfg = tmp_path / "job.toml"
    write_images(tmp_path / "imgs", 2)
    cfg.write_text(
        'name = "run"\n[data]\ndir = "imgs"\ninstance_prompt = "a red circle"\n[train]\nsteps = 10\n[monitor]\nwindow = 2\n'
    )
    try:
        assert dallm_main(["run", str(cfg), "--home", str(home), "--devices", "cpu"]) == 0
        out = capsys.readouterr()
        assert (
            "started" in out.err and "job 1 finished" in out.out and str(home / "jobs" / "1-run") in out.out
        )
        # `make demo` runs this: it says the daemon stays and how to stop it
        assert f"the daemon keeps running on {home}; stop it with: dallm-daemon stop --home {home}" in out.err
        assert dallm_main(["run", str(cfg), "--home", str(home)]) == 0  # reuses the daemon
        assert "started" not in capsys.readouterr().err
    finally:
        info = DaemonPaths(home).read_info()
        if info:
            with contextlib.suppress(OSError):
                os.kill(info["pid"], signal.SIGKILL)


def test_listing_does_not_import_torch(tmp_path: Path) -> None:
    """`dallm ls` and friends talk to the daemon only: torch (seconds to import) stays unloaded."""
    code = (
        "import sys\nfrom dallm.cli import main\n"
        f"rc = main(['ls', '--home', {str(tmp_path)!r}])\n"
        "print(rc, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["3", "[]"], out.stdout + out.stderr


def test_rollback_rolls_the_summary_kid_back(daemons) -> None:
    """A rollback from 44 to 20 erased the evaluation of step 40: the summary (`ls`, the queue) shows
    step 20's KID and spread, not step 40's (the fake engine logs kid_val = 1/step every eval.every)."""
    d = daemons(step_s=0.02)
    with d.client() as c:
        job = c.submit(config("a", steps=1000, every=10, eval={"every": 10})).id
        wait_step(c, job, 44)
        assert c.summary(job).kid_val == pytest.approx(1 / 40)
        c.rollback(job, 20)
        s = wait_state(c, job, "stopped")
        assert (s.step, s.kid_val, s.kid_val_std) == (20, pytest.approx(1 / 20), pytest.approx(0.1 / 20))
        assert next(j for j in c.jobs() if j.id == job).kid_val == pytest.approx(1 / 20)


def test_finish_only_rollback_of_an_ended_job_says_what_it_waits_for(daemons) -> None:
    """With the one slot taken, the rollback waits as queued and says for what; then it trains no
    step and is `stopping` (writing the result), never `running` with an ETA."""
    d = daemons(step_s=0.02)
    with d.client() as c:
        done = c.submit(config("done", steps=20, every=5)).id
        wait_state(c, done, "finished")
        busy = c.submit(config("busy", steps=5000, every=1000)).id
        wait_state(c, busy, "running")
        c.rollback(done, 10)
        s = c.summary(done)
        assert s.state == "queued" and f"waits for a free slot (running: job {busy})" in s.reason
        c.cancel(busy)
        s = wait_state(c, done, "stopped")
        assert s.result_step == 10
        states = [t.to_state for t in c.show(done).transitions]
        assert states[-4:] == ["finished", "queued", "stopping", "stopped"], states
        assert "writing the result of step 10" in c.show(done).transitions[-2].reason
