"""What tui/compat.py relies on in Textual and textual-image, checked against the installed versions:
a release that renames or reshapes one of these internals fails here (pyproject.toml pins the range
this ran on). What the workarounds draw is checked in tests/test_tui_frames.py."""

from __future__ import annotations

import inspect

import pytest
from PIL import Image
from textual.app import App, ComposeResult
from textual.widgets import DataTable, OptionList
from textual.widgets.data_table import ColumnKey, RowKey

from dallm.tui.compat import CellSixelImage, set_cell_in_place

pytestmark = [pytest.mark.anyio, pytest.mark.xdist_group("tui")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class TableApp(App[None]):
    def compose(self) -> ComposeResult:
        yield DataTable()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_column("Name", key="name")
        table.add_column("Step", key="step")
        for i in range(3):
            table.add_row(f"job-{i}", "10/100", key=str(i))


def cache_keys(table: DataTable, row: RowKey) -> tuple[set, set]:
    """The keys of the cell and row render caches that belong to `row`, and to the other rows."""
    keys = {k for cache in (table._cell_render_cache, table._row_render_cache) for k in cache.keys()}  # noqa: SIM118 (LRUCache: no iterator)
    return {k for k in keys if k[0] == row}, {k for k in keys if k[0] != row}


def test_datatable_and_option_list_internals_have_the_shape_we_use() -> None:
    table = DataTable()
    assert isinstance(table._data, dict) and isinstance(table._update_count, int)
    for name in ("_cell_render_cache", "_row_render_cache", "_row_renderable_cache", "_line_cache"):
        cache = getattr(table, name)
        assert callable(cache.keys) and callable(cache.discard), name
    assert list(inspect.signature(table._get_offsets).parameters) == ["y"]
    assert "update_width" in inspect.signature(table.update_cell).parameters
    # CheckpointList (tui/widgets.py) extends OptionList's watcher to tell the user's moves from its own
    assert list(inspect.signature(OptionList.watch_highlighted).parameters) == ["self", "highlighted"]


async def test_set_cell_in_place_redraws_its_row_and_keeps_the_other_rows_cached() -> None:
    app = TableApp()
    async with app.run_test(size=(60, 10)) as pilot:
        table = app.query_one(DataTable)
        await pilot.pause()
        row = RowKey("1")
        # the first render fills the caches; the keys we drop lead with the row key
        assert table._get_offsets(table.get_row_index(row) + 1)[0] == row  # line 0: the header
        mine, others = cache_keys(table, row)
        assert mine and others
        count = table._update_count

        set_cell_in_place(table, "1", "step", "11/100")
        assert table._data[row][ColumnKey("step")] == "11/100"
        assert table._update_count == count  # no table-wide invalidation (update_cell's)
        assert not cache_keys(table, row)[0]  # the row's cached renders are gone ...
        assert cache_keys(table, row)[1] == others  # ... the other rows' stay
        await pilot.pause()
        assert "11/100" in table.render_line(table.get_row_index(row) + 1).text
        assert "10/100" in table.render_line(table.get_row_index(RowKey("0")) + 1).text

        set_cell_in_place(table, "2", "step", "100000/100")  # wider than the column: update_cell's path
        await pilot.pause()
        assert table.columns[ColumnKey("step")].content_width == len("100000/100")
        assert "100000/100" in table.render_line(table.get_row_index(RowKey("2")) + 1).text


def test_textual_image_sixel_internals_have_the_shape_cell_sixel_image_uses() -> None:
    from textual_image._pixeldata import PixelData
    from textual_image._terminal import CellSize
    from textual_image.widget._base import Image as BaseImage
    from textual_image.widget.sixel import Image as SixelImage
    from textual_image.widget.sixel import _ImageSixelImpl, _NoopRenderable

    impl = inspect.signature
    assert list(impl(_ImageSixelImpl.__init__).parameters) == ["self", "image", "sixel_options"]
    assert list(impl(_ImageSixelImpl._scale_image).parameters) == ["self", "image_data", "terminal_sizes"]
    assert list(impl(_ImageSixelImpl._get_sixel_segments).parameters) == ["self", "sixel_data"]
    assert list(impl(_ImageSixelImpl.render_lines).parameters) == ["self", "crop"]
    assert isinstance(BaseImage.image, property) and BaseImage.image.fset is not None
    assert list(impl(PixelData.scaled).parameters)[:3] == ["self", "width", "height"]
    assert {"width", "height"} <= set(CellSize._fields)
    assert SixelImage._Renderable is _NoopRenderable  # what CellSixelImage passes as Renderable=

    image = Image.new("RGB", (8, 8))
    widget = CellSixelImage(image)  # its __init__ keeps the image and the options where we read them
    assert widget._image is image and hasattr(widget, "_sixel_options")
    assert PixelData(image).scaled(4, 2).pil_image.size == (4, 2)
