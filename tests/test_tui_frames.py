"""What a live frame redraws (bench/bench_tui.py measures how long it takes): a queue update redraws
the rows it changes, not the whole table."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from dallm.protocol import JobSummary, MetricsEvent
from dallm.testing.fake_daemon import FakeConnection
from dallm.tui.app import DallmApp
from dallm.tui.demo import job_events, metrics_at
from dallm.tui.widgets import ConnectionBar, JobTable

pytestmark = [pytest.mark.anyio, pytest.mark.xdist_group("tui")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def three_running_jobs() -> FakeConnection:
    """Three running jobs at step 50 of 100, without phases (nothing else ticks in their rows)."""
    conn = FakeConnection(endpoint="test://frames")
    for job in (1, 2, 3):
        conn.add_job(JobSummary(id=job, name=f"job-{job}", state="queued", total_steps=100))
        conn.emit(job, *job_events(50, 100, samples=False), live=False)
        conn.set_state(job, "running", live=False)
    return conn


async def until(pilot, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.02)


def row_text(table: JobTable, job: int) -> str:
    """The table's line of `job` as drawn (the header is line 0)."""
    return table.render_line(table.get_row_index(str(job)) + 1).text


async def shown(pilot, app: DallmApp) -> JobTable:
    """The queue, once it shows the three jobs at step 50."""
    table = app.query_one(JobTable)
    await until(pilot, lambda: app.query_one(ConnectionBar).connected and table.row_count == 3)
    await until(pilot, lambda: all("50/100" in row_text(table, job) for job in (1, 2, 3)))
    return table


async def test_a_queue_update_redraws_only_the_row_it_changes() -> None:
    conn = three_running_jobs()
    app = DallmApp(conn, poll_timeout=0.02, backoff=(0.05, 0.2))
    async with app.run_test(size=(120, 40)) as pilot:
        table = await shown(pilot, app)
        await pilot.pause(0.6)  # the queue's first redraws are done
        rendered: list[int] = []  # row index of every cell DataTable renders from now on
        render_cell = table._render_cell

        def counting(row_index: int, column_index: int, *args, **kwargs):
            rendered.append(row_index)
            return render_cell(row_index, column_index, *args, **kwargs)

        table._render_cell = counting  # type: ignore[method-assign]
        conn.emit(1, MetricsEvent(step=51, values=metrics_at(51, 100)))
        await until(pilot, lambda: "51/100" in row_text(table, 1))
        await pilot.pause(0.1)  # the frame that shows it is drawn
        row = table.get_row_index("1")
        # DataTable's own update_cell re-renders every cell of the table (header included).
        assert rendered and set(rendered) == {row}
        for other in (2, 3):
            assert "50/100" in row_text(table, other)


async def test_a_value_wider_than_its_column_widens_it() -> None:
    conn = three_running_jobs()
    app = DallmApp(conn, poll_timeout=0.02, backoff=(0.05, 0.2))
    async with app.run_test(size=(120, 40)) as pilot:
        table = await shown(pilot, app)
        width = table.columns["step"].content_width  # type: ignore[index]
        conn.emit(2, MetricsEvent(step=100_000, values=metrics_at(100_000, 100)))  # "100000/100"
        await until(pilot, lambda: "100000/100" in row_text(table, 2))
        assert table.columns["step"].content_width > width  # type: ignore[index]
        assert "50/100" in row_text(table, 1)
