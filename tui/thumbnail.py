"""Sample grids drawn with textual-image: the side-pane thumbnail of the selected job (with a position
in its sample history) and the labelled grid both it and the gallery use.

The engine's thumbnail is one PNG of prompts (rows) x seeds (columns). `SampleGrid` cuts it into its
cells and shows each under a `prompt · seed` label, so every image says what it is; each cell's image
is sized to fill its cell (aspect kept, in the terminal's cell proportions), so the images grow with
the pane. A pane too small for images one can judge (80x24) shows a hint to open the gallery instead:
an image of a few cells, or a prompt whose row got no room, says nothing.
"""

from __future__ import annotations

from PIL import Image
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Container, Vertical
from textual.events import Click, Resize
from textual.reactive import reactive, var
from textual.widgets import Static

from dallm.tui import images
from dallm.tui.model import HistoryView, Sample

MIN_COLS, MIN_ROWS = 10, 5  # the smallest image worth judging, in terminal cells
TOO_SMALL = "too small to judge here: g opens the gallery"


def cell_aspect() -> float:
    """A terminal cell's width over its height (pixels); 0.5 when the terminal did not say."""
    try:
        from textual_image._terminal import get_cell_size

        size = get_cell_size()
        return size.width / size.height if size.width and size.height else 0.5
    except Exception:
        return 0.5


def fitted(image_w: int, image_h: int, cols: int, rows: int, aspect: float) -> tuple[int, int]:
    """The largest (columns, rows) within `cols` x `rows` that shows a `image_w` x `image_h` image
    undistorted, with cells `aspect` (width/height) as wide as high."""
    ratio = image_h / image_w * aspect  # rows per column
    width = max(1, min(cols, int(rows / ratio)))
    return width, max(1, min(rows, round(width * ratio)))


def cell_label(prompt: str | None, seed: int | None) -> str:
    parts = [p for p in (prompt, None if seed is None else f"seed {seed}") if p]
    return " · ".join(parts)


def generations_text(texts: list[str]) -> Text:
    """An LLM job's generations, one after another in alternating colours (Static wraps them)."""
    out = Text()
    for i, text in enumerate(texts):
        out.append(text + "\n", style="green" if i % 2 == 0 else "cyan")
    return out


class SampleCell(Vertical):
    """One image under its label; `set` swaps both in place (no remounting)."""

    DEFAULT_CSS = """
    SampleCell { height: 1fr; width: 1fr; }
    SampleCell > .cell-label { height: 1; width: 1fr; color: $text-muted; text-wrap: nowrap; text-overflow: ellipsis; }
    SampleCell > .cell-image { height: 1fr; width: 1fr; align: center middle; }
    SampleCell > .cell-image > * { width: auto; height: auto; }
    """

    def __init__(self, mode: images.ImageMode, label: str, image: Image.Image | None) -> None:
        super().__init__()
        self.mode, self.label, self.image = mode, label, image

    def compose(self) -> ComposeResult:
        yield Static(Text(self.label, no_wrap=True, overflow="ellipsis"), classes="cell-label")
        widget = images.widget_class(self.mode)
        with Container(classes="cell-image"):
            if widget is not None:
                yield widget(self.image)  # type: ignore[call-arg]

    def fit(self, cols: int, rows: int) -> None:
        """Size the image to fill `cols` x `rows` cells (below its label), its aspect kept."""
        if self.image is None:
            return
        width, height = fitted(self.image.width, self.image.height, cols, rows, cell_aspect())
        for widget in self.query(".cell-image > *"):
            widget.styles.width, widget.styles.height = width, height

    def set(self, label: str, image: Image.Image | None) -> None:
        self.label, self.image = label, image
        if not self.is_mounted:
            return  # compose draws them
        self.query_one(".cell-label", Static).update(Text(label, no_wrap=True, overflow="ellipsis"))
        for widget in self.query_one(".cell-image", Container).children:
            widget.image = image  # type: ignore[attr-defined]


class SampleGrid(Container):
    """A sample grid as labelled cells (prompts x seeds); one unlabelled image when the grid's layout
    is unknown (an event without prompts or seeds).

    Synchronous on purpose: a new grid of the same layout swaps the images in place; only another
    layout remounts. (An async update, cancelled by the next one in the middle of its remove/mount,
    left the app waiting for ever under load: seen in bench_tui and a Pilot test.)"""

    DEFAULT_CSS = """
    SampleGrid { layout: grid; grid-gutter: 0 1; height: 1fr; }
    SampleGrid > .grid-note { color: $text-muted; }
    """

    def __init__(self, mode: images.ImageMode = "halfblock", **kwargs) -> None:
        super().__init__(**kwargs)
        self.mode = mode
        self.sample: Sample | None = None
        self.layout_size = (1, 1)  # rows, columns of the grid shown
        self.small = False  # the hint to open the gallery is shown instead of the images

    def cell_space(self, rows: int, cols: int) -> tuple[int, int]:
        """Columns and rows for one cell's image (its label takes a row, the gutter a column)."""
        return (self.size.width - (cols - 1)) // cols, self.size.height // rows - 1

    def too_small(self, rows: int, cols: int) -> bool:
        if not self.size.width or not self.size.height:
            return False  # not laid out yet: on_resize decides
        width, height = self.cell_space(rows, cols)
        return width < MIN_COLS or height < MIN_ROWS

    def on_resize(self, event: Resize) -> None:
        sample = self.sample
        if sample is None or sample.texts:
            return
        if self.small != self.too_small(*self.layout_size):
            self.show(sample, force=True)
        else:
            self._fit()

    def _fit(self) -> None:
        cols, rows = self.cell_space(*self.layout_size)
        for cell in self.query(SampleCell):
            cell.fit(cols, rows)

    def show(self, sample: Sample | None, empty: str = "no samples yet", force: bool = False) -> None:
        if sample is self.sample and self.children and not force:
            return
        self.sample = sample
        if sample is not None and sample.texts:  # an LLM job: its latest generations as text
            self._note_only(generations_text(sample.texts))
            return
        image = images.decode(sample.png) if sample is not None else None
        if sample is None or image is None:
            self._note_only(empty if sample is None else "(unreadable image)")
            return
        rows, cols = len(sample.prompts), len(sample.seeds)
        cells = images.grid_cells(image, rows, cols) if rows and cols else None
        if cells is None:
            rows, cols, labels, cells = 1, 1, [" · ".join(sample.prompts)], [image]
        else:
            labels = [cell_label(p, s) for p in sample.prompts for s in sample.seeds]
        self.layout_size = (rows, cols)
        self.small = self.too_small(rows, cols)
        if self.small:
            self._note_only(TOO_SMALL)
            return
        current = [c for c in self.children if isinstance(c, SampleCell)]
        if len(current) == len(cells) and len(current) == len(self.children):
            for cell, label, picture in zip(current, labels, cells, strict=True):
                cell.set(label, picture)
            self._fit()
            return
        self.styles.grid_size_columns, self.styles.grid_size_rows = cols, rows
        self.remove_children()
        self.mount_all(
            [SampleCell(self.mode, label, cell) for label, cell in zip(labels, cells, strict=True)]
        )
        self.call_after_refresh(self._fit)

    def _note_only(self, text: str | Text) -> None:
        notes = [c for c in self.children if isinstance(c, Static)]
        if len(self.children) == 1 and notes:
            notes[0].update(text)
            return
        self.styles.grid_size_columns, self.styles.grid_size_rows = 1, 1
        self.remove_children()
        self.mount(Static(text, classes="grid-note"))


class Thumbnail(Vertical):
    """The selected job's sample grid (from `history`, bound to the app's selected job): the latest,
    unless the user stepped back (`older`/`newer`)."""

    DEFAULT_CSS = """
    Thumbnail { height: 1fr; min-height: 3; }
    Thumbnail > .caption { height: 1; color: $text-muted; }
    """

    index: reactive[int] = reactive(-1)  # -1: follow the latest sample
    history: var[HistoryView | None] = var(None)

    def __init__(self, mode: images.ImageMode = "halfblock", **kwargs) -> None:
        super().__init__(**kwargs)
        self.mode = mode
        self.samples: list[Sample] = []
        self._job: int | None = None
        self._n = -1

    def compose(self) -> ComposeResult:
        yield Static(self.caption(), classes="caption")
        yield SampleGrid(self.mode)

    def on_mount(self) -> None:
        self._redraw()

    # -- data -----------------------------------------------------------------------------------

    def watch_history(self, history: HistoryView | None) -> None:
        job = history.job if history else None
        samples = history.data.samples if history else []
        if job != self._job:
            self._job = job
            self.index = -1
        if samples is not self.samples or len(samples) != self._n:
            self.samples = samples
            self._n = len(samples)
            if self.index >= len(samples):
                self.index = -1
            self._redraw()

    @property
    def position(self) -> int | None:
        if not self.samples:
            return None
        return len(self.samples) - 1 if self.index < 0 else self.index

    @property
    def current(self) -> Sample | None:
        pos = self.position
        return None if pos is None else self.samples[pos]

    def older(self) -> None:
        pos = self.position
        if pos is not None and pos > 0:
            self.index = pos - 1

    def newer(self) -> None:
        pos = self.position
        if pos is None:
            return
        self.index = -1 if pos + 1 >= len(self.samples) - 1 else pos + 1

    def watch_index(self) -> None:
        self._redraw()

    def on_click(self, event: Click) -> None:
        if event.x < self.size.width // 2:
            self.older()
        else:
            self.newer()

    # -- drawing --------------------------------------------------------------------------------

    def caption(self) -> str:
        sample = self.current
        if sample is None:
            return "no samples yet"
        pos = self.position or 0
        follow = "latest" if self.index < 0 else "[ ] to browse, latest with ]"
        return f"step {sample.step}  ({pos + 1}/{len(self.samples)}, {follow})"

    def _redraw(self) -> None:
        if not self.is_mounted:
            return
        self.query_one(".caption", Static).update(self.caption())
        self.query_one(SampleGrid).show(self.current)
