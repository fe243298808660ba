"""Pilot tests of issue 14's fixes: a rollback's erased points, the checkpoint list's cursor, the demo
daemon's rollback and end, the cancel / checkpoint-now keys, KID spread, run order and following."""

from __future__ import annotations

import pytest
from test_tui import header_text, loaded, make_app, notifications, until

from dallm.protocol import CheckpointEvent, JobSummary, MetricsEvent, RolledBackEvent, StartedEvent
from dallm.testing.fake_daemon import FakeConnection
from dallm.tui.chart import Chart
from dallm.tui.connection import Action
from dallm.tui.demo import DemoRunner, demo_connection
from dallm.tui.screens import ConfirmScreen, RollbackScreen
from dallm.tui.widgets import CheckpointList, JobTable

pytestmark = [pytest.mark.anyio, pytest.mark.xdist_group("tui")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def conn() -> FakeConnection:
    return demo_connection(points=300)


def lagging_job() -> FakeConnection:
    """A running job whose CS-Fluctuation lags 20 steps (placed at cs_fluct_step = step - 20)."""
    conn = FakeConnection([JobSummary(id=1, name="lag", state="running", total_steps=100)])
    conn.emit(1, StartedEvent(start_step=0, total_steps=100, device="cpu", trainable_params=1), live=False)
    for step in range(1, 61):
        values = {"loss": 1.0 / step}
        if step > 20:
            values |= {"cs_fluct": float(step), "cs_fluct_step": float(step - 20)}
        conn.emit(1, MetricsEvent(step=step, values=values), live=False)
    return conn


async def test_rollback_erases_lagging_points_by_the_step_they_were_logged_at() -> None:
    conn = lagging_job()
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        conn.emit(1, RolledBackEvent(step=30, resume=True))
        data = app.model.data[1]
        await until(pilot, lambda: data.series["loss"].n == 30)
        fluct = data.series["cs_fluct"]
        # Logged at 21..30 (placed at 1..10) stay; logged at 31..60 are the rollback's.
        assert list(fluct.values) == [float(s) for s in range(21, 31)]
        assert list(data.superseded["cs_fluct"].values) == [float(s) for s in range(31, 61)]
        await pilot.pause()
        top = app.query_one("#chart-top", Chart)
        live = [t for t in top.traces if not t.dim]
        assert len(live) == 1 and live[0].values[-1] == 30.0  # the legend's value is the kept one
        assert "cs_fluct 30" in top.render_line(0).text


async def test_first_down_in_the_checkpoint_list_moves_to_the_next_one(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        checkpoints = app.query_one(CheckpointList)
        await until(pilot, lambda: checkpoints.option_count == 4)  # 300, 200, 180 (TP), 100
        await pilot.press("tab")  # from the queue to the checkpoint list, as a user gets there
        await until(pilot, lambda: checkpoints.has_focus)
        assert checkpoints.chosen_step == 300
        await pilot.press("down")
        assert checkpoints.chosen_step == 200
        await pilot.press("r")
        assert isinstance(app.screen, RollbackScreen) and "step 200" in app.screen.question


async def test_first_down_after_checkpoints_arrived_one_by_one_moves_to_the_second() -> None:
    """Broken 3 as a user met it: checkpoints arrive live one at a time, each rebuild kept the
    cursor on the step it was on (the oldest), so the first ↓ wrapped round to the top. Until the
    user moves it, the cursor follows the newest checkpoint; once moved, it stays on that step."""
    conn = FakeConnection([JobSummary(id=1, name="live", state="running", total_steps=1000)])
    conn.emit(1, StartedEvent(start_step=0, total_steps=1000, device="cpu", trainable_params=1), live=False)
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        checkpoints = app.query_one(CheckpointList)
        for step in (20, 40, 60):
            conn.emit(1, MetricsEvent(step=step, values={"loss": 0.1}), CheckpointEvent(step=step, path="c"))
            await until(pilot, lambda n=step // 20: checkpoints.option_count == n)
        assert checkpoints.chosen_step == 60
        await pilot.press("tab")
        await until(pilot, lambda: checkpoints.has_focus)
        await pilot.press("down")
        assert checkpoints.chosen_step == 40
        conn.emit(1, MetricsEvent(step=80, values={"loss": 0.1}), CheckpointEvent(step=80, path="c"))
        await until(pilot, lambda: checkpoints.option_count == 4)
        assert checkpoints.chosen_step == 40  # the user's pick stays
        await pilot.press("r")
        assert isinstance(app.screen, RollbackScreen) and "step 40" in app.screen.question


async def test_demo_rolls_back_a_finished_job_and_ends_its_running_one() -> None:
    conn = demo_connection(points=995)
    runner = DemoRunner(conn, interval=0.01)
    app = make_app(conn)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, loaded(app))
            runner.start()
            # Job 1 reaches its last step and finishes (it sat at "running 1000/1000 ETA 0s").
            await until(pilot, lambda: app.model.jobs[1].state == "finished")
            assert app.model.jobs[1].step == 1000
            app.query_one(JobTable).move_cursor(row=app.query_one(JobTable).get_row_index("2"))
            await until(pilot, lambda: app.selected == 2 and loaded(app, 2)())
            checkpoints = app.query_one(CheckpointList)
            await until(pilot, lambda: checkpoints.option_count > 2)
            checkpoints.focus()
            await pilot.press("down")
            step = checkpoints.chosen_step
            assert step is not None and step < 1000
            await pilot.press("r", "f")
            await until(pilot, lambda: app.model.jobs[2].state == "stopped")
            assert app.model.jobs[2].result_step == step
            assert f"rolled back to step {step}" in header_text(app)
    finally:
        runner.stop()


async def test_cancel_is_shift_x_and_says_outputs_stay_c_is_checkpoint_now(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        await pilot.press("c")
        await until(pilot, lambda: Action("checkpoint", 1) in conn.sent)
        assert not isinstance(app.screen, ConfirmScreen)
        await until(pilot, lambda: "1: checkpoint requested" in notifications(app))
        await pilot.press("x")  # lower case does nothing
        await pilot.pause(0.05)
        assert not isinstance(app.screen, ConfirmScreen)
        await pilot.press("X")
        assert isinstance(app.screen, ConfirmScreen)
        assert "no result weights are written" in app.screen.question and "stays in" in app.screen.question
        await pilot.press("y")
        await until(pilot, lambda: Action("cancel", 1) in conn.sent)


async def test_checkpoint_now_of_a_job_not_running_is_refused_here(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        app.query_one(JobTable).move_cursor(row=app.query_one(JobTable).get_row_index("2"))
        await until(pilot, lambda: app.selected == 2)
        await pilot.press("c")
        await until(pilot, lambda: any("only a running job" in m for m in notifications(app)))
        assert conn.sent == []


async def test_kid_is_shown_with_its_spread(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        conn.emit(1, MetricsEvent(step=301, values={"kid_val": 0.0016, "kid_val_std": 0.13, "val_loss": 0.21,
                                                    "fidelity": 0.85}))  # fmt: skip
        table = app.query_one(JobTable)
        await until(pilot, lambda: str(table.get_cell("1", "val")) == "KID 0.0016±0.13")
        assert str(table.get_cell("1", "vloss")) == "0.2100" and str(table.get_cell("1", "fid")) == "0.85"


def row_order(app) -> list[str]:
    return [row.key.value for row in app.query_one(JobTable).ordered_rows]


async def test_queue_in_run_order_and_the_selection_follows_the_job_that_starts(
    conn: FakeConnection,
) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        # running, then queued, then ended (newest first)
        assert row_order(app) == ["1", "4", "3", "2"]
        assert app.selected == 1
        conn.set_state(1, "finished", "completed")
        conn.set_state(4, "running", "started")
        await until(pilot, lambda: app.model.jobs[4].state == "running")
        await until(pilot, lambda: app.selected == 4)
        assert row_order(app)[0] == "4"
        assert app.query_one(JobTable).current_job == 4


async def test_the_selection_stays_on_a_job_the_user_picked(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        await pilot.press("down", "down", "down")  # 1, 4, 3, 2: the finished job 2
        await until(pilot, lambda: app.selected == 2)
        conn.set_state(4, "running", "started")
        await until(pilot, lambda: app.model.jobs[4].state == "running")
        await pilot.pause(0.1)
        assert app.selected == 2 and app.query_one(JobTable).current_job == 2
