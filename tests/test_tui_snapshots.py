"""Snapshots of dallm-tui's main layouts (120x40 and 80x24) on deterministic fake jobs.

Update after an intended change with: pytest tests/test_tui_snapshots.py --snapshot-update
"""

from __future__ import annotations

import time

import pytest

from dallm.testing.fake_daemon import FakeConnection
from dallm.tui.app import DallmApp
from dallm.tui.chart import Chart
from dallm.tui.demo import demo_connection, script_gpu_machine
from dallm.tui.views.compare import CompareScreen
from dallm.tui.views.logs import LogTailScreen
from dallm.tui.views.resources import ResourcesScreen
from dallm.tui.widgets import ConnectionBar, JobTable

pytestmark = pytest.mark.xdist_group("tui")


def app_with(conn: FakeConnection) -> DallmApp:
    return DallmApp(conn, images_mode="halfblock", poll_timeout=0.02, backoff=(0.05, 0.2))


def ready(job: int | None = 1):
    async def run_before(pilot) -> None:
        app = pilot.app
        deadline = time.monotonic() + 10

        def done() -> bool:
            if not (app.query_one(ConnectionBar).connected and app.listed):
                return False
            if job is None:
                return True
            d = app.model.data.get(job)
            return d is not None and d.loaded and app.selected == job

        while not done():
            assert time.monotonic() < deadline, "the app did not load"
            await pilot.pause(0.02)
        await pilot.pause(0.1)

    return run_before


@pytest.mark.parametrize("size", [(120, 40), (80, 24)], ids=["120x40", "80x24"])
def test_running_job(snap_compare, size) -> None:
    assert snap_compare(app_with(demo_connection(points=400)), terminal_size=size, run_before=ready())


@pytest.mark.parametrize("size", [(120, 40), (80, 24)], ids=["120x40", "80x24"])
def test_failed_job(snap_compare, size) -> None:
    async def select_failed(pilot) -> None:
        await ready()(pilot)
        await pilot.press("down", "down")
        await ready(3)(pilot)

    assert snap_compare(app_with(demo_connection(points=400)), terminal_size=size, run_before=select_failed)


def test_empty_queue(snap_compare) -> None:
    assert snap_compare(app_with(FakeConnection()), terminal_size=(80, 24), run_before=ready(None))


def test_loss_and_cs_view(snap_compare) -> None:
    async def toggle(pilot) -> None:
        await ready()(pilot)
        await pilot.press("t")
        await pilot.pause(0.1)

    assert snap_compare(app_with(demo_connection(points=400)), terminal_size=(120, 40), run_before=toggle)


def test_stop_confirmation(snap_compare) -> None:
    async def ask(pilot) -> None:
        await ready()(pilot)
        await pilot.press("s")
        await pilot.pause(0.1)

    assert snap_compare(app_with(demo_connection(points=400)), terminal_size=(80, 24), run_before=ask)


# -- the views of tui/views/ ----------------------------------------------------------------------


def until_true(pilot, predicate, timeout: float = 10.0):
    async def wait() -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "the view did not fill"
            await pilot.pause(0.02)
        await pilot.pause(0.2)

    return wait()


async def select_job(pilot, job: int) -> None:
    await ready()(pilot)
    table = pilot.app.query_one(JobTable)
    table.move_cursor(row=table.get_row_index(str(job)))
    await until_true(pilot, lambda: pilot.app.selected == job)


def test_compare_view(snap_compare) -> None:
    async def compare(pilot) -> None:
        await select_job(pilot, 1)
        await pilot.press("space")
        await select_job(pilot, 2)
        await pilot.press("space", "v")
        await until_true(pilot, lambda: isinstance(pilot.app.screen, CompareScreen))
        charts = pilot.app.screen.query(Chart)
        await until_true(pilot, lambda: all(len(c.traces) == 2 for c in charts))

    assert snap_compare(app_with(demo_connection(points=400)), terminal_size=(120, 40), run_before=compare)


def test_log_tail_of_a_failed_job(snap_compare) -> None:
    async def logs(pilot) -> None:
        await select_job(pilot, 3)
        await pilot.press("l")
        await until_true(pilot, lambda: isinstance(pilot.app.screen, LogTailScreen))
        await until_true(pilot, lambda: any("OutOfMemoryError" in x for x in pilot.app.screen.log_lines))

    assert snap_compare(app_with(demo_connection(points=400)), terminal_size=(100, 24), run_before=logs)


def test_resources_view(snap_compare) -> None:
    conn = demo_connection(points=400)
    script_gpu_machine(conn, t=0.0)

    async def resources(pilot) -> None:
        await ready()(pilot)
        await pilot.press("u")
        await until_true(pilot, lambda: isinstance(pilot.app.screen, ResourcesScreen))
        await until_true(pilot, lambda: pilot.app.screen.query_one("#resources-jobs").row_count == 2)

    assert snap_compare(app_with(conn), terminal_size=(120, 30), run_before=resources)


def test_queue_filtered(snap_compare) -> None:
    async def search(pilot) -> None:
        await ready()(pilot)
        await pilot.press("slash", *"sweep", "enter")
        await until_true(pilot, lambda: pilot.app.query_one(JobTable).row_count == 2)

    assert snap_compare(app_with(demo_connection(points=400)), terminal_size=(80, 24), run_before=search)
