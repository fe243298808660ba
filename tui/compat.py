"""Where the TUI relies on the internals of Textual and textual-image, all of it in this module:
tests/test_tui_compat.py checks each name and behaviour used here, and pyproject.toml pins both
libraries to the versions that test ran on (constraints.txt has the exact ones). A new version that
moves one fails that test, not a frame in front of a user.

- `set_cell_in_place`: DataTable's `update_cell` without re-rendering the whole table (Textual:
  `DataTable._data`, its four render caches, `_update_count`, `_get_offsets`).
- `CellSixelImage`: textual-image's Sixel widget with its inner `_ImageSixelImpl` replaced, so that it
  leaves no stale pixels in a full-screen app (textual-image: `_ImageSixelImpl`, `_NoopRenderable`,
  `PixelData`, `CellSize`, `Image._image` / `_sixel_options`).

(One more reliance stays with its widget, as it is an override, not a workaround: CheckpointList
extends OptionList's `watch_highlighted`; the same test checks it.)

The Sixel widget, made to leave no stale pixels in a full-screen Textual app (seen in xterm:
`docs/tui.md`, "Tried as a user"):

A Sixel image is pixels over the text grid: only text written over them erases them, and textual-image
writes no text in the image's cells (it gives Textual empty lines there). What then left old
pixels on screen or drew in the wrong place (four fixes):

- the image was scaled to the cells its aspect ratio fills, which can be a column or row fewer than the
  widget has: the cells left over were never written, so whatever was there before stayed (a previous
  image, the screen under the gallery). Here the image fills every cell of the widget (its parent sizes
  it to the image's aspect in whole cells already, so the stretch is under a cell);
- after the image the cursor was put one row *below* the widget (textual-image issue #146): in a full
  redraw Textual writes the rest of that line without moving the cursor, so the cells right of the
  image's last row went one row down and that row kept old content. Here: the image's last row;
- the rows above the image's last were empty strips, which Textual's compositor treats as no piece:
  the widget behind filled them with blank cells whenever a partial update covered them without the
  last row (seen as upper gallery images cut down to their last row). Here each is a cursor move
  across the image's width (writes nothing, keeps the rest of the line in place);
- a new image remounted the inner widget (`refresh(recompose=True)`): one frame blanked the region and
  the next drew the image, two frames that a partial update could split. Here the inner widget stays
  and is told the new image.
"""

from __future__ import annotations

from typing import IO

from PIL import Image as PILImage
from rich.cells import cell_len
from rich.control import Control
from rich.segment import ControlType, Segment
from rich.style import Style
from textual.app import ComposeResult
from textual.geometry import Region
from textual.strip import Strip
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey, RowKey
from textual_image._pixeldata import PixelData
from textual_image._terminal import CellSize
from textual_image.widget.sixel import Image as SixelImage
from textual_image.widget.sixel import _ImageSixelImpl, _NoopRenderable

_NULL = Style()


def set_cell_in_place(table: DataTable, row: str, column: str, value: object) -> None:
    """`table.update_cell(row, column, value)`, redrawing only the row it changes.

    DataTable keys every render cache by one update counter, so its `update_cell` re-renders
    every cell of the table (through Rich) in the next frame; a step counter ticking in one row
    re-rendered all of them twice a second: 10 rows cost 25-120 ms, the slowest frames of
    bench_tui. Here the changed row's cached lines are dropped and only its region is
    refreshed. A value wider than its column takes DataTable's own path (the column widens,
    every line moves)."""
    row_key, column_key = RowKey(row), ColumnKey(column)
    if cell_len(str(value)) > table.columns[column_key].content_width:
        table.update_cell(row_key, column_key, value, update_width=True)
        return
    table._data[row_key][column_key] = value
    _forget_row(table, row_key)
    table.refresh_row(table.get_row_index(row_key))


def _forget_row(table: DataTable, row_key: RowKey) -> None:
    """Drop `row_key`'s entries from DataTable's render caches (the rest stay valid)."""
    for cache in (table._cell_render_cache, table._row_render_cache):
        keys = cache.keys()  # LRUCache has no iterator of its own
        for k in [k for k in keys if k[0] == row_key]:
            cache.discard(k)
    table._row_renderable_cache.discard((table._update_count, table.get_row_index(row_key)))
    for k in list(table._line_cache.keys()):
        try:
            if table._get_offsets(k[0])[0] == row_key:
                table._line_cache.discard(k)
        except LookupError:  # a line of no row (past the end): nothing of ours
            continue


class _CellSixels(_ImageSixelImpl):
    """The widget that injects the Sixel data: the image over all its cells, the cursor left on its
    last row."""

    def _scale_image(self, image_data: PixelData, terminal_sizes: CellSize) -> PixelData:
        size = self.content_size
        return image_data.scaled(size.width * terminal_sizes.width, size.height * terminal_sizes.height)

    def render_lines(self, crop: Region) -> list[Strip]:
        lines = super().render_lines(crop)
        # The rows above the last write nothing over the image but move the cursor across it. An
        # empty strip (textual-image's) is no piece when Textual cuts the line, so the widget
        # behind filled it with blank cells (a partial update erased those image rows); an empty
        # strip of the right width leaves the cursor where it was, and a full redraw, which joins
        # a line's pieces without moving the cursor, wrote the cells right of the image over the
        # image instead (their old pixels stayed).
        width = crop.width
        skip = Segment(f"\x1b[{width}C", style=_NULL, control=((ControlType.CURSOR_FORWARD, width),))
        return [Strip([skip], width) for _ in lines[:-1]] + lines[-1:]

    def _get_sixel_segments(self, sixel_data: str) -> list[Segment]:
        region = self.screen.find_widget(self).visible_region
        # One control segment (no width): Textual cuts a line into pieces at widget edges by cell
        # widths, and the cursor moves as plain text (7 "cells" of escape code) could be cut in
        # two, which moved the image to wherever the cursor was. The next cell Textual writes on
        # this line is the one right of the image, on its last row.
        payload = (
            Control.move_to(region.x, region.y).segment.text
            + sixel_data
            + Control.move_to(region.right, region.bottom - 1).segment.text
        )
        return [Segment(payload, style=_NULL, control=((ControlType.CURSOR_FORWARD, 0),))]


class CellSixelImage(SixelImage, Renderable=_NoopRenderable):
    """textual-image's Sixel `Image` with `_CellSixels` inside; a new image keeps the inner widget."""

    @property  # type: ignore[override]
    def image(self) -> str | IO[bytes] | PILImage.Image | None:
        return self._image

    @image.setter
    def image(self, value: str | IO[bytes] | PILImage.Image | None) -> None:
        # The base widget's setter (size, layout); not the Sixel one's recompose.
        super(SixelImage, type(self)).image.fset(self, value)  # type: ignore[attr-defined]
        for inner in self.query(_CellSixels) if self.is_mounted else ():
            inner.image = value
            inner.refresh()

    def compose(self) -> ComposeResult:
        yield _CellSixels(self.image, self._sixel_options)
