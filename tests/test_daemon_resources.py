# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""The daemon's answers for the TUI's views: the worker log (tail, then what follows, tracebacks
included), resources (host, GPUs or why none, running jobs) and each job's peak memory."""

from __future__ import annotations

from pathlib import Path

import pytest
from daemon_helpers import config, daemons, home, wait_state, wait_step  # noqa: F401

from dallm.cli import main as dallm_main
from dallm.client.client import DaemonError
from dallm.protocol import MAX_WORKER_LOG_BYTES, WorkerLogRequest


def test_worker_log_tail_follow_and_a_failed_jobs_traceback(daemons) -> None:
    d = daemons(step_s=0.005)
    with d.client() as c:
        job = c.submit(config("boom-nan.4", steps=20, every=5))
        wait_state(c, job.id, "failed")
        tail = c.worker_log(job.id)
        assert tail.path.endswith(f"{job.id}-boom-nan.4/worker.log")
        assert "Traceback (most recent call last):" in tail.text
        assert "FloatingPointError: loss is NaN at step 4" in tail.text
        assert tail.end == tail.size and tail.text.endswith("\n")
        # following: nothing new since the end; a read from an offset gives the rest of the file
        assert c.worker_log(job.id, tail.end).text == ""
        rest = c.worker_log(job.id, 5)
        assert rest.start == 5 and Path(tail.path).read_bytes()[5:].decode() == rest.text
        # a small tail starts at a line's start
        small = c.worker_log(job.id, max_bytes=40)
        assert small.text and Path(tail.path).read_text().endswith(small.text)
        assert small.start == 0 or Path(tail.path).read_bytes()[small.start - 1 : small.start] == b"\n"


def test_worker_log_of_a_job_that_never_ran_and_bad_requests(daemons) -> None:
    d = daemons(step_s=0.005, runner="dallm.testing.fake_engine:train")
    with d.client() as c:
        first = c.submit(config("long", steps=100000, every=1000))
        queued = c.submit(config("waits", steps=10, every=5))
        wait_step(c, first.id, 1)
        empty = c.worker_log(queued.id)
        assert (empty.text, empty.size) == ("", 0)
        with pytest.raises(DaemonError) as e:
            c.worker_log(999)
        assert e.value.code == "not_found" and "999" in str(e.value)
        with pytest.raises(ValueError):
            WorkerLogRequest(job="1", max_bytes=MAX_WORKER_LOG_BYTES + 1)
        c.cancel(first.id)


def test_resources_and_peak_memory(daemons, capsys) -> None:
    d = daemons(step_s=0.01)
    with d.client() as c:
        job = c.submit(config("long", steps=100000, every=1000))
        wait_step(c, job.id, 5)
        usage = c.resources()
        assert usage.host.cpu_count >= 1 and 0 < usage.host.mem_used_mb <= usage.host.mem_total_mb
        assert usage.gpus or usage.gpu_note.startswith("no GPU")  # here: no NVML, said so
        (mine,) = [u for u in usage.jobs if u.job == job.id]
        assert mine.rss_mb > 10 and mine.pid > 0
        c.stop(job.id)
        done = wait_state(c, job.id, {"stopped", "finished"})
        # the worker reported its peak before it ended: in the row and in `dallm show`
        assert done.peak_rss_mb is not None and done.peak_rss_mb >= mine.rss_mb - 1
        assert c.show(job.id).summary.peak_rss_mb == done.peak_rss_mb
    assert dallm_main(["show", str(job.id), "--home", str(d.home)]) == 0
    assert f"peak memory: {done.peak_rss_mb:,.0f} MiB resident" in capsys.readouterr().out
