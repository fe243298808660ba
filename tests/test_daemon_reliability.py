# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""The reliability list of the daemon issue, each one a test (fake engine; fault injection by job
name, see dallm.testing.fake_engine)."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import zmq
from daemon_helpers import config, daemons, home, metric_steps, wait_state, wait_step  # noqa: F401

from dallm.protocol import (
    MAX_CONTROL_BYTES,
    PROTOCOL_VERSION,
    PingRequest,
    StopRequest,
    decode_reply,
    encode_request,
)


def worker_pids(home: Path, job: int) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            ours = b"dallm.daemon.worker" in cmd and any(str(home).encode() in part for part in cmd)
            if ours and cmd[cmd.index(b"--job") + 1] == str(job).encode():
                pids.append(int(proc.name))
    return pids


def test_kill9_daemon_then_restart_resumes(daemons, home: Path) -> None:
    d = daemons(step_s=0.03)
    with d.client() as c:
        running = c.submit(config("a", steps=60, every=10))
        queued = c.submit(config("b", steps=5))
        wait_step(c, running.id, 25)
    d.kill9()
    end = time.monotonic() + 10
    while worker_pids(home, running.id) and time.monotonic() < end:
        time.sleep(0.05)
    assert not worker_pids(home, running.id), "the worker outlived its daemon"
    db = sqlite3.connect(home / "dallm.db")  # as if the dying daemon had not committed steps 3-5
    db.execute("DELETE FROM events WHERE kind = 'metrics' AND step BETWEEN 3 AND 5")
    db.commit()
    db.close()
    d2 = daemons(step_s=0.01)
    with d2.client() as c:
        assert c.summary(queued.id).state == "queued"
        reasons = [t.reason for t in c.show(running.id).transitions]
        assert any("daemon restarted" in r for r in reasons)
        s = wait_state(c, running.id, {"finished", "failed"})
        assert s.state == "finished", s.reason
        assert "resuming from its last checkpoint" in c.show(running.id).transitions[-2].reason
        # continued without duplicates; the holes were filled from metrics.jsonl (stored later)
        assert sorted(metric_steps(c, running.id)) == list(range(1, 61))
        assert any("3 metric step(s) up to" in line.message for line in c.logs(running.id).lines)
        assert wait_state(c, queued.id, "finished")


def test_kill9_worker_fails_the_job_and_the_next_runs(daemons, home: Path) -> None:
    d = daemons(step_s=0.02)
    with d.client() as c:
        victim = c.submit(config("victim", steps=500))
        retried = c.submit(config("retried", steps=40, every=5), retries=1)
        wait_step(c, victim.id, 3)
        os.kill(worker_pids(home, victim.id)[0], signal.SIGKILL)
        s = wait_state(c, victim.id, "failed")
        assert "worker died (killed by SIGKILL)" in s.reason
        wait_step(c, retried.id, 12)
        os.kill(worker_pids(home, retried.id)[0], signal.SIGKILL)
        s = wait_state(c, retried.id, {"finished", "failed"})
        assert s.state == "finished" and s.attempts == 2
        assert any("retry 1/1" in t.reason for t in c.show(retried.id).transitions)
        assert metric_steps(c, retried.id) == list(range(1, 41))


def test_nan_oom_and_crash_fail_only_their_job(daemons) -> None:
    d = daemons(step_s=0.005)
    with d.client() as c:
        nan = c.submit(config("x-nan.3", steps=10))
        oom = c.submit(config("x-oom.2", steps=10))
        died = c.submit(config("x-exit.2", steps=10))
        fine = c.submit(config("fine", steps=5))
        assert "NaN loss" in wait_state(c, nan.id, "failed").reason
        assert wait_state(c, oom.id, "failed").reason.startswith("CUDA out of memory")
        assert "exit code 17" in wait_state(c, died.id, "failed").reason
        assert wait_state(c, fine.id, "finished")
        assert c.ping().pid
        assert any(line.level == "error" for line in c.logs(nan.id).lines)


def test_full_disk_during_checkpoint_keeps_the_previous_one(daemons) -> None:
    d = daemons(step_s=0.005)
    with d.client() as c:
        job = c.submit(config("x-diskfull.10", steps=20, every=5))
        s = wait_state(c, job.id, "failed")
        assert s.reason.startswith("disk full") and "No space left on device" in s.reason
        ckpts = Path(s.out_dir) / "checkpoints"
        assert sorted(p.name for p in ckpts.iterdir()) == ["step-000005"]
        assert json.loads((ckpts / "step-000005" / "state.json").read_text())["step"] == 5


def _garbage(rng: random.Random, i: int) -> list[bytes]:
    good = encode_request(i, StopRequest(job="1"))
    kind = i % 8
    if kind == 0:
        return [rng.randbytes(rng.randint(0, 300))]
    if kind == 1:
        return [good[: rng.randint(0, len(good) - 1)]]
    if kind == 2:
        return [good.replace(f'"v":{PROTOCOL_VERSION}'.encode(), b'"v":99')]
    if kind == 3:
        return [
            json.dumps(
                {"v": PROTOCOL_VERSION, "id": i, "req": {"op": rng.choice(["rm", "", "ping2"])}}
            ).encode()
        ]
    if kind == 4:
        return [
            json.dumps(
                {"v": PROTOCOL_VERSION, "id": i, "req": {"op": "rollback", "job": 1, "step": -5}}
            ).encode()
        ]
    if kind == 5:
        return [good, rng.randbytes(10)]  # two frames
    if kind == 6:
        return [b"", rng.randbytes(50)]  # REQ-style envelope, garbage body
    return [json.dumps([i, "x" * rng.randint(0, 1000)]).encode()]


def test_10000_bad_frames_are_refused_and_the_daemon_serves_on(daemons) -> None:
    d = daemons()
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(d.client().endpoint)
    rng = random.Random(0)
    refused = 0
    try:
        for start in range(0, 10_000, 500):
            for i in range(start, start + 500):
                sock.send_multipart(_garbage(rng, i))
            for _ in range(500):
                assert sock.poll(10_000), "the daemon stopped answering"
                frames = sock.recv_multipart()
                if frames[0] == b"":
                    frames = frames[1:]
                _, rep = decode_reply(frames)
                assert rep.op == "error", rep
                refused += 1
        assert refused == 10_000
        # Oversized frames: the socket drops the peer (ZMQ_MAXMSGSIZE), nothing reaches the daemon.
        for _ in range(5):
            big = ctx.socket(zmq.DEALER)
            big.setsockopt(zmq.LINGER, 0)
            big.connect(d.client().endpoint)
            big.send(b"{" + b" " * (MAX_CONTROL_BYTES + 10))
            assert not big.poll(300)
            big.close()
        sock.send(encode_request(1, PingRequest()))
        assert sock.poll(5000)
        assert decode_reply(sock.recv_multipart())[1].op == "pong"
    finally:
        sock.close()
    with d.client() as c:
        job = c.submit(config("after", steps=3))
        assert wait_state(c, job.id, "finished")


def _blast_run(c, name: str) -> tuple[float, int]:
    job = c.submit(config(name, steps=100, every=50, samples={"every": 5, "prompts": ["p"]}))
    s = wait_state(c, job.id, "finished", timeout=120)
    tr = c.show(job.id).transitions
    return tr[-1].t - tr[-2].t, s.id


def test_a_subscriber_that_never_reads_does_not_slow_training(daemons) -> None:
    d = daemons(step_s=0.0)
    with d.client() as c:
        base, _ = _blast_run(c, "base-blast.100")
        stalled = zmq.Context.instance().socket(zmq.SUB)
        stalled.setsockopt(zmq.RCVHWM, 10)
        stalled.setsockopt(zmq.RCVBUF, 4096)
        stalled.setsockopt(zmq.LINGER, 0)
        stalled.setsockopt(zmq.SUBSCRIBE, b"")
        stalled.connect(c.events_endpoint)
        time.sleep(0.2)
        try:
            slow, job = _blast_run(c, "stalled-blast.100")
        finally:
            stalled.close()
        assert slow < 2 * base + 1.0, (base, slow)
        events, _ = c.history_all(0, [f"job/{job}/"], kinds=["metrics"], include_png=False)
        assert len(events) == 100 * 100  # the store has everything


def test_500_queued_jobs_list_fast(daemons, home: Path, capsys) -> None:
    d = daemons(step_s=0.05)
    with d.client() as c:
        c.submit(config("long", steps=100_000))
        for i in range(500):
            c.submit(config(f"q{i}", steps=10), priority=i % 3)
        t0 = time.perf_counter()
        jobs = c.jobs()
        took = time.perf_counter() - t0
        assert len(jobs) == 501 and sum(j.state == "queued" for j in jobs) == 500
        assert took < 0.5, took
        t0 = time.perf_counter()
        assert len(c.jobs(states=["running"])) == 1 and time.perf_counter() - t0 < 0.2
    from dallm.cli import main as dallm_main

    assert dallm_main(["ls", "--home", str(home)]) == 0  # first: the CLI's imports
    capsys.readouterr()
    t0 = time.perf_counter()
    assert dallm_main(["ls", "--home", str(home)]) == 0
    assert time.perf_counter() - t0 < 1.0
    assert len(capsys.readouterr().out.splitlines()) >= 502


def test_stop_and_cancel_asked_before_a_daemon_crash_are_carried_out(daemons) -> None:
    d = daemons(step_s=0.5)  # the workers poll for commands only every 0.5 s
    with d.client() as c:
        to_stop = c.submit(config("s", steps=1000, every=1))
        wait_step(c, to_stop.id, 1)
        c.stop(to_stop.id)
    d.kill9()  # before the worker saw the stop
    d2 = daemons("--max-jobs", "2", step_s=0.01)
    with d2.client() as c:
        s = wait_state(c, to_stop.id, {"stopped", "finished", "failed"})
        assert s.state == "stopped", s.reason
        # Either the restarted daemon carried the stop out (requeue, then stop), or the worker had
        # the stop already and finished while no daemon ran (daemon/reconcile.py ends it with its
        # result): which one depends on when the kill lands against the worker's 0.5 s poll.
        reasons = [t.reason for t in c.show(to_stop.id).transitions]
        assert any("daemon restarted" in r or "while the daemon was down" in r for r in reasons), reasons
        to_cancel = c.submit(config("c", steps=100_000, every=1000))
        wait_step(c, to_cancel.id, 2)
        c.cancel(to_cancel.id)
    d2.kill9()  # most likely before it saw its worker end
    d3 = daemons(step_s=0.01)
    with d3.client() as c:
        assert c.summary(to_cancel.id).state == "cancelled"
        assert c.ping().counts == {"stopped": 1, "cancelled": 1}
