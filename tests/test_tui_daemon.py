"""dallm-tui against a real daemon (child process, fake engine): queue, live history, a failed job's
reason, `s` stops a running job (the daemon reports stopped), kill -9 + restart: reconnect."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon_helpers import config, daemons, home, wait_state  # noqa: F401

from dallm.tui.app import DallmApp
from dallm.tui.connection import open_connection
from dallm.tui.screens import ConfirmScreen
from dallm.tui.widgets import ConnectionBar, JobHeader

pytestmark = [pytest.mark.anyio, pytest.mark.xdist_group("tui-daemon")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def until(pilot, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.05)


def points(app: DallmApp, job: int, name: str = "loss") -> int:
    d = app.model.data.get(job)
    s = d.series.get(name) if d is not None and d.loaded else None
    return len(s) if s is not None else 0


async def test_tui_on_a_real_daemon(home: Path, daemons) -> None:  # noqa: F811
    d = daemons(step_s=0.05)
    c = d.client()
    failing = c.submit(config("broken-nan.3", steps=50, every=10), priority=5)
    wait_state(c, failing.id, "failed")
    samples = {"every": 10, "prompts": ["a red circle"]}
    job = c.submit(config("long-tp.15", steps=2000, every=20, samples=samples))
    wait_state(c, job.id, "running")

    app = DallmApp(open_connection(home=str(home)), poll_timeout=0.05, backoff=(0.2, 1.0))
    async with app.run_test(size=(120, 40)) as pilot:
        bar = app.query_one(ConnectionBar)
        jid, fid = job.id, failing.id
        await until(pilot, lambda: bar.connected and app.selected == jid)  # the running job first
        await until(pilot, lambda: points(app, jid) > 20)
        await until(pilot, lambda: app.model.data[jid].turning_point == 15)
        await until(pilot, lambda: len(app.model.data[jid].samples) >= 2)

        # The failed job shows why.
        app.selected = fid
        await until(pilot, lambda: app.model.data[fid].loaded)
        assert "failed" in str(app.query_one(JobHeader).render())
        assert "nan" in app.model.jobs[fid].reason.lower()

        # kill -9 the daemon: "disconnected"; start it again: reconnected, the job goes on.
        app.selected = jid
        d.kill9()
        await until(pilot, lambda: not bar.connected, timeout=15)
        d2 = daemons(step_s=0.05)
        await until(pilot, lambda: bar.connected, timeout=15)
        wait_state(d2.client(), job.id, "running")
        before = points(app, jid)
        await until(pilot, lambda: points(app, jid) > before + 5)
        steps = app.model.data[jid].series["loss"].steps
        assert (steps[1:] > steps[:-1]).all()  # no duplicates after the backfill

        # `s` (confirmed) stops it; the daemon reports stopped. (The TUI must have seen the
        # restarted job running first: `s` is refused for a job it still shows queued.)
        await until(pilot, lambda: app.model.jobs[jid].state == "running" and app.selected == jid)
        await pilot.press("s")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await until(pilot, lambda: app.model.jobs[jid].state == "stopped")
        assert wait_state(d2.client(), job.id, "stopped").state == "stopped"
