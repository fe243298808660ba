"""What a live frame redraws (bench/bench_tui.py measures how long it takes): a queue update redraws
the rows it changes, not the whole table; a Sixel image writes one unit that fills its cells."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from PIL import Image
from textual.app import App, ComposeResult
from textual.geometry import Region
from textual.strip import Strip
from textual_image._terminal import get_cell_size

from dallm.protocol import JobSummary, MetricsEvent
from dallm.testing.fake_daemon import FakeConnection
from dallm.tui import images
from dallm.tui.app import DallmApp
from dallm.tui.chart import Chart
from dallm.tui.compat import CellSixelImage
from dallm.tui.demo import job_events, metrics_at
from dallm.tui.gallery import GalleryScreen
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


# -- Sixel images (tui/compat.py): what is written to the terminal ---------------------------------


class SixelApp(App[None]):
    """One Sixel image widget of 12x5 cells at (3, 2)."""

    CSS = "Image { width: 12; height: 5; offset: 3 2; }"  # textual-image's Image and ours

    def __init__(self, image: Image.Image) -> None:
        super().__init__()
        self.image = image

    def compose(self) -> ComposeResult:
        yield images.widget_class("sixel")(self.image)  # type: ignore[misc]


def sixel_lines(app: SixelApp) -> tuple[object, list[Strip]]:
    inner = app.query_one(CellSixelImage).children[0]
    return inner, inner.render_lines(Region(0, 0, inner.size.width, inner.size.height))


async def test_sixel_image_fills_its_cells_and_moves_the_cursor_as_one_unit() -> None:
    app = SixelApp(Image.new("RGB", (40, 10), "red"))  # wider than the 12x5 cells' aspect
    async with app.run_test(size=(40, 12)) as pilot:
        await pilot.pause()
        inner, lines = sixel_lines(app)
        region = app.screen.find_widget(inner).visible_region
        assert len(lines) == 5
        for line in lines[:-1]:  # above the last row: a cursor move across the image, one piece
            [skip] = list(line)
            assert line.cell_length == 12 and skip.control and skip.text == "\x1b[12C"
            assert line.divide([12]) == [line]
        [segment] = list(lines[-1])  # one segment: Textual cannot cut an escape code in two
        assert segment.control and segment.cell_length == 0
        text = segment.text
        # Drawn at the widget's top-left; the cursor left right of it on its last row (not below).
        assert text.startswith(f"\x1b[{region.y + 1};{region.x + 1}H\x1bP")
        assert text.endswith(f"\x1b[{region.bottom};{region.right + 1}H")
        # The image covers every cell: its raster is the cells' size in pixels.
        cell = get_cell_size()
        assert f'"1;1;{12 * cell.width};{5 * cell.height}' in text
        for piece in lines[-1].divide([1, 5, 12]):  # cut at widget edges: the code stays whole
            assert all(not s.text or s.text == text for s in piece)


async def test_a_new_sixel_image_keeps_the_inner_widget() -> None:
    app = SixelApp(Image.new("RGB", (40, 10), "red"))
    async with app.run_test(size=(40, 12)) as pilot:
        await pilot.pause()
        widget = app.query_one(CellSixelImage)
        inner = widget.children[0]
        blue = Image.new("RGB", (40, 10), "blue")
        widget.image = blue
        await pilot.pause()
        # textual-image's own widget remounts it (a blank frame, then the image in another).
        assert widget.children[0] is inner and inner.image is blue
        _, lines = sixel_lines(app)
        assert "\x1bP" in lines[-1]._segments[0].text


async def test_the_dashboard_waits_under_the_gallery_and_is_repainted_after_it() -> None:
    conn = three_running_jobs()
    app = DallmApp(conn, poll_timeout=0.02, backoff=(0.05, 0.2))
    async with app.run_test(size=(120, 40)) as pilot:
        table = await shown(pilot, app)
        await until(pilot, lambda: app.selected == 1 and app.model.data[1].loaded)
        await pilot.press("g")
        await until(pilot, lambda: isinstance(app.screen, GalleryScreen))
        drawn: list[int] = []
        for chart in app.screen_stack[0].query(Chart):
            set_data = chart.set_data

            def counting(*args, _set_data=set_data, **kwargs) -> None:
                drawn.append(1)
                _set_data(*args, **kwargs)

            chart.set_data = counting  # type: ignore[method-assign]
        conn.emit(1, MetricsEvent(step=51, values=metrics_at(51, 100)))
        await until(pilot, lambda: app.model.data[1].series["loss"].n == 51)
        await pilot.pause(0.6)
        # Nothing of the dashboard shows under an opaque screen: Textual would forward its
        # changes to the gallery as repaints (re-sending every Sixel image).
        assert drawn == []
        repaints: list[int] = []
        refresh = app.screen_stack[0].refresh
        app.screen_stack[0].refresh = lambda *a, **k: repaints.append(1) or refresh(*a, **k)  # type: ignore[method-assign]
        await pilot.press("escape")
        await until(pilot, lambda: "51/100" in row_text(table, 1))
        assert drawn and repaints  # drawn on return, and every cell repainted
