"""Pilot tests of dallm-tui against an in-memory daemon (FakeConnection): every key sends the right
request and shows the answer; reconnect with backfill; empty queue; a failed job shows its reason."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from textual_image.widget import HalfcellImage

from dallm.protocol import MetricsEvent
from dallm.testing.fake_daemon import FakeConnection
from dallm.tui.app import EMPTY_QUEUE, DallmApp
from dallm.tui.chart import Chart, format_number
from dallm.tui.chart_panel import Charts
from dallm.tui.connection import Action, ActionResult
from dallm.tui.demo import demo_connection, job_events
from dallm.tui.gallery import GalleryScreen
from dallm.tui.screens import ConfirmScreen, HelpScreen, RollbackScreen
from dallm.tui.thumbnail import SampleGrid, Thumbnail
from dallm.tui.widgets import ActivityLog, CheckpointList, ConnectionBar, JobHeader, JobTable

pytestmark = [pytest.mark.anyio, pytest.mark.xdist_group("tui")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_app(conn: FakeConnection) -> DallmApp:
    return DallmApp(conn, poll_timeout=0.02, backoff=(0.05, 0.2))


async def until(pilot, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.02)


def loaded(app: DallmApp, job: int = 1) -> Callable[[], bool]:
    def check() -> bool:
        d = app.model.data.get(job)
        return d is not None and d.loaded and app.query_one(ConnectionBar).connected

    return check


def log_text(app: DallmApp) -> str:
    return "\n".join(strip.text for strip in app.query_one(ActivityLog).lines)


def header_text(app: DallmApp) -> str:
    return str(app.query_one(JobHeader).render())


def notifications(app: DallmApp) -> list[str]:
    return [n.message for n in app._notifications]


@pytest.fixture
def conn() -> FakeConnection:
    return demo_connection(points=300)


async def test_empty_queue() -> None:
    app = make_app(FakeConnection())
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: app.query_one(ConnectionBar).connected and app.listed)
        await pilot.pause()
        assert EMPTY_QUEUE in header_text(app)
        assert app.query_one(JobTable).row_count == 0
        await pilot.press("s")
        await until(pilot, lambda: any("no job to stop" in m for m in notifications(app)))
        assert not isinstance(app.screen, ConfirmScreen)


async def test_failed_job_shows_its_reason(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        await pilot.press("down", "down")  # job 3, the failed one (run order: 1, 4, 3, 2)
        await until(pilot, loaded(app, 3))
        await pilot.pause()
        assert app.selected == 3
        assert "oom: CUDA out of memory at step 137" in header_text(app)
        assert "failed" in header_text(app)
        assert "CUDA out of memory at step 137" in log_text(app)


async def test_stop_asks_then_sends_and_shows_the_reply(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        await pilot.press("s")
        assert isinstance(app.screen, ConfirmScreen)
        assert "turning-point weights (step 180)" in app.screen.question
        await pilot.press("y")
        await until(pilot, lambda: conn.sent == [Action("stop", 1)])
        await until(pilot, lambda: "1: stopping" in notifications(app))
        assert "✓ 1: stopping" in log_text(app)


async def test_stop_declined_sends_nothing(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        await pilot.press("s")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        await pilot.pause(0.1)
        assert conn.sent == []
        assert not isinstance(app.screen, ConfirmScreen)


async def test_stop_refused_by_the_daemon_shows_the_error(conn: FakeConnection) -> None:
    conn.replies["stop"] = ActionResult(False, "job 1 is not running")
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        await pilot.press("s", "y")
        await until(pilot, lambda: "job 1 is not running" in notifications(app))
        assert "✗ job 1 is not running" in log_text(app)


@pytest.mark.parametrize(("key", "resume"), [("f", False), ("r", True)])
async def test_rollback_to_the_chosen_checkpoint(conn: FakeConnection, key: str, resume: bool) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        checkpoints = app.query_one(CheckpointList)
        await until(pilot, lambda: checkpoints.option_count == 4)  # 300, 200, 180 (TP), 100
        checkpoints.focus()
        await pilot.press("down")
        assert checkpoints.chosen_step == 200
        await pilot.press("r")
        assert isinstance(app.screen, RollbackScreen)
        assert "step 200" in app.screen.question
        await pilot.press(key)
        await until(pilot, lambda: conn.sent == [Action("rollback", 1, step=200, resume=resume)])
        await until(pilot, lambda: "1: rolling back" in notifications(app))


async def test_rollback_back_out(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        await until(pilot, lambda: app.query_one(CheckpointList).option_count > 0)
        await pilot.press("r")
        assert isinstance(app.screen, RollbackScreen)
        await pilot.press("escape")
        await pilot.pause(0.1)
        assert conn.sent == []


async def test_cancel_and_priority_keys(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        await pilot.press("X")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await until(pilot, lambda: Action("cancel", 1) in conn.sent)
        await pilot.press("plus")
        await until(pilot, lambda: Action("priority", 1, priority=1) in conn.sent)
        await until(pilot, lambda: app.model.jobs[1].priority == 1)  # the queue was listed again
        await pilot.press("minus")
        await until(pilot, lambda: Action("priority", 1, priority=0) in conn.sent)
        await until(pilot, lambda: "1: priority 0" in notifications(app))


async def test_finished_job_cannot_be_stopped(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        await pilot.press("down", "down", "down")  # run order: 1 running, 4 queued, 3, 2 ended
        await until(pilot, lambda: app.selected == 2)
        await pilot.press("s")
        await until(pilot, lambda: any("already finished" in m for m in notifications(app)))
        assert conn.sent == []


async def test_live_events_update_queue_and_charts(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        series = app.model.data[1].series["loss"]
        assert len(series) == 300
        conn.emit(1, *job_events(320, 1000, start=300))
        await until(pilot, lambda: len(series) == 320)
        table = app.query_one(JobTable)
        await until(pilot, lambda: str(table.get_cell("1", "step")) == "320/1000")
        assert app.model.data[1].samples[-1].step == 300


async def test_reconnect_backfills_without_gaps_or_duplicates(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        bar = app.query_one(ConnectionBar)
        conn.go_down()
        await until(pilot, lambda: not bar.connected)
        assert "retrying in" in bar.detail
        await until(pilot, lambda: any("no daemon" in m for m in notifications(app)))
        # Actions while disconnected say so.
        await pilot.press("plus")
        await until(pilot, lambda: any(m.startswith("not sent") for m in notifications(app)))
        # The job went on while the TUI could not see it.
        conn.emit(1, *job_events(350, 1000, start=300), live=False)
        conn.come_back()
        await until(pilot, lambda: bar.connected)
        series = app.model.data[1].series["loss"]
        await until(pilot, lambda: len(series) == 350)
        conn.emit(1, MetricsEvent(step=351, values={"loss": 0.1}))
        await until(pilot, lambda: len(series) == 351)
        steps = series.steps
        assert list(steps) == list(range(1, 352))
        assert app.model.jobs[1].step == 351


async def test_help_toggle_and_sample_keys(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        charts = app.query_one(Charts)
        await pilot.press("t")
        assert charts.view == "loss"
        await pilot.press("t")
        assert charts.view == "fluct"
        thumb = app.query_one(Thumbnail)
        await until(pilot, lambda: len(thumb.samples) == 6)
        assert thumb.position == 5 and thumb.current.step == 300
        await pilot.press("left_square_bracket", "left_square_bracket")
        assert thumb.current.step == 200
        await pilot.press("right_square_bracket")
        assert thumb.current.step == 250
        await pilot.press("right_square_bracket")
        assert thumb.index == -1 and thumb.current.step == 300


@pytest.mark.parametrize("size", [(120, 40), (80, 24)])
async def test_help_fits_the_screen(conn: FakeConnection, size: tuple[int, int]) -> None:
    # It was a 17-column strip of wrapped text, taller than the screen (seen in xterm at 160x48).
    app = make_app(conn)
    async with app.run_test(size=size) as pilot:
        await until(pilot, loaded(app))
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen))
        await pilot.pause()
        dialog = app.screen.query_one(".dialog")
        assert app.screen.region.contains_region(dialog.region)
        assert dialog.region.width >= min(90, size[0] * 0.8)


async def test_charts_paint_their_background(conn: FakeConnection) -> None:
    # Cells left at the terminal's default background showed as white panes in a stock xterm.
    # (The thumbnail is textual-image widgets in containers now: Textual paints those.)
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        await pilot.press("comma")  # the cursor column too
        for widget in app.query(Chart):
            for y in range(widget.size.height + 1):  # one past the end: the blank line
                for segment in widget.render_line(y):
                    assert segment.style is not None and segment.style.bgcolor is not None, (widget, y)


async def test_mouse_selects_a_job(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        assert app.selected == 1
        await pilot.click(JobTable, offset=(5, 3))  # header row, then rows 1..: row index 2 = job 3
        await until(pilot, lambda: app.selected == 3)
        await until(pilot, lambda: "sweep-r1-n5" in header_text(app))


def test_main_rejects_unknown_image_mode(capsys) -> None:
    from dallm.tui.app import main

    with pytest.raises(SystemExit) as exited:
        main(["--images", "png"])
    assert exited.value.code == 2
    assert "--images: invalid choice: 'png'" in capsys.readouterr().err


async def test_initial_job_is_shown_first(conn: FakeConnection) -> None:
    app = DallmApp(conn, poll_timeout=0.02, backoff=(0.05, 0.2), initial_job=4)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.selected == 4 and app.model.data[4].loaded)
        assert "teacher-style-50" in header_text(app)


def test_command_line() -> None:
    from dallm.tui.app import build_parser

    args = build_parser().parse_args(["--home", "/tmp/h", "--images", "halfblock", "--job", "3"])
    assert (args.home, args.images, args.job, args.connect, args.demo) == (
        "/tmp/h",
        "halfblock",
        3,
        None,
        False,
    )
    assert build_parser().parse_args([]).images == "auto"


async def test_phase_and_its_time_show_while_the_step_stands_still() -> None:
    """During an evaluation no metrics come: the header and the queue say what the job does and
    for how long (the clock moves on its own), and the ETA counts the evaluations to come."""
    from dallm.protocol import JobSummary, PhaseEvent, StartedEvent

    conn = FakeConnection([JobSummary(id=1, name="phased", state="running", total_steps=100)])
    conn.emit(1, StartedEvent(start_step=0, total_steps=100, device="cpu", trainable_params=1, eval_every=20),
              MetricsEvent(step=40, values={"loss": 0.1, "steps_per_s": 2.0, "eval_stop_seconds": 10.0}),
              live=False)  # fmt: skip
    app = make_app(conn)
    async with app.run_test(size=(140, 40)) as pilot:
        await until(pilot, loaded(app))
        table = app.query_one(JobTable)
        assert str(table.get_cell("1", "eta")) == "1m00s"  # 60 steps at 2/s + 3 evaluations of 10 s
        assert "·" not in header_text(app)  # no phase named yet: none shown
        conn.emit(1, PhaseEvent(phase="kid", step=40, at=time.time() - 65))
        await until(pilot, lambda: "kid 1m0" in header_text(app))
        await until(pilot, lambda: "kid 1m0" in str(table.get_cell("1", "phase")))
        first = header_text(app)
        await until(pilot, lambda: header_text(app) != first and "kid 1m" in header_text(app))  # ticks alone
        conn.emit(1, PhaseEvent(phase="training", step=40, at=time.time()))
        await until(pilot, lambda: "training 0s" in header_text(app))
        conn.set_state(1, "finished", "completed")
        await until(pilot, lambda: "finished" in header_text(app))
        await until(pilot, lambda: str(table.get_cell("1", "phase")) == "-")
        assert "training" not in header_text(app)


# -- charts and the gallery (issue 14: chart interaction, sample gallery) -------------------------


def chart_lines(app: DallmApp, which: str = "#chart-top") -> list[str]:
    chart = app.query_one(which, Chart)
    return [strip.text for strip in chart._draw(chart.size.width, chart.size.height)]


async def test_zoom_pan_and_reset(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        charts = app.query_one(Charts)
        full = charts._full
        assert full == (1.0, 300.0) and charts.window is None
        assert chart_lines(app)[-1].split() == ["1", "300"]
        await pilot.press("z")
        a, b = charts.window
        assert b - a == pytest.approx((full[1] - full[0]) / 2) and a < 150 < b  # about the centre
        await pilot.press("z", "z", "z", "z", "z", "z", "z")
        assert charts.window[1] - charts.window[0] == 10  # no closer than 10 steps
        for chart in app.query(Chart):  # both charts show the window
            assert chart.x_range == charts.window
        await pilot.press("0", "z", "less_than_sign", "less_than_sign", "less_than_sign")
        assert charts.window[0] == 1.0  # panned to the start, no further
        await pilot.press("greater_than_sign")
        assert charts.window[0] > 1.0
        shown = chart_lines(app)[-1].split()
        assert [float(x) for x in shown] == pytest.approx(list(charts.window), abs=0.5)
        await pilot.press("Z", "Z")
        assert charts.window is None  # zoomed out to the whole run
        await pilot.press("z", "0")
        assert charts.window is None and charts.cursor is None


async def test_cursor_reads_values_and_clicks_set_it(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        charts = app.query_one(Charts)
        await pilot.press("comma")
        assert charts.cursor == 150  # shown at the centre first
        data = app.model.data[1]
        legend = chart_lines(app, "#chart-bottom")[0]
        # KID is evaluated every 50 steps: the cursor reads the evaluation at 150, with its spread
        val = data.series["kid_val"].at(150)
        std = data.series["kid_val_std"].at(150)
        assert "@ step 150" in legend and f"val {format_number(val)}±{format_number(std)}" in legend
        await pilot.press("full_stop", "full_stop")
        assert charts.cursor > 150
        await pilot.click("#chart-bottom", offset=(8, 5))  # the first column of the plot
        assert charts.cursor == 1


async def test_log_scale_and_smoothing_keys(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        top = app.query_one("#chart-top", Chart)
        assert top.log_y and "(log)" in chart_lines(app)[0]  # CS-Fluctuation starts on a log axis
        await pilot.press("y")
        assert not top.log_y and "(log)" not in chart_lines(app)[0]
        await pilot.press("t", "e")
        await until(pilot, lambda: "smoothed 0.6" in top.title)
        assert [t.dim for t in top.traces] == [True, False]  # the raw curve, faint, under the smoothed
        assert "smoothing 0.6" in notifications(app)
        await pilot.press("e", "e", "e")
        assert top.title == "Loss" and len(top.traces) == 1


async def test_gallery_sets_base_turning_point_and_latest_side_by_side() -> None:
    app = make_app(demo_connection(points=400))
    async with app.run_test(size=(160, 48)) as pilot:
        await until(pilot, loaded(app))
        await pilot.press("g")
        await until(pilot, lambda: isinstance(app.screen, GalleryScreen))
        screen = app.screen
        await pilot.pause(0.3)
        titles = [str(w.render()) for w in screen.query(".column-title")]
        assert titles == [
            "base model",
            "turning point (step 240, grid of step 200)",
            "latest (step 400)",
        ]
        grids = list(screen.query(SampleGrid))
        await until(pilot, lambda: all(len(g.query(HalfcellImage)) == 4 for g in grids))
        labels = [str(w.render()) for w in grids[2].query(".cell-label")]
        assert labels == ["a red circle · seed 0", "a red circle · seed 1", "a blue square · seed 0",
                          "a blue square · seed 1"]  # fmt: skip
        # each column's images are drawn at one size (textual-image fits them to their cells)
        sizes = [g.query_one(HalfcellImage).size for g in grids]
        assert sizes[0].width >= 20 and sizes[0].height == sizes[1].height == sizes[2].height
        await pilot.press("left_square_bracket")
        await until(pilot, lambda: "7/8 (step 350)" in str(screen.query(".column-title").last().render()))
        await pilot.press("escape")
        assert not isinstance(app.screen, GalleryScreen)


async def test_side_thumbnail_is_labelled_and_grows_with_the_pane() -> None:
    app = DallmApp(demo_connection(points=400), images_mode="halfblock", poll_timeout=0.02)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, loaded(app))
        thumb = app.query_one(Thumbnail)
        await until(pilot, lambda: len(thumb.query(HalfcellImage)) == 4)
        assert [str(w.render()) for w in thumb.query(".cell-label")][0] == "a red circle · seed 0"
        small = thumb.query_one(HalfcellImage).size
        await pilot.resize_terminal(200, 60)
        await until(pilot, lambda: thumb.query_one(HalfcellImage).size.width > small.width)
