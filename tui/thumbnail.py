"""The sample-grid thumbnail of the selected job, with a position in its sample history."""

from __future__ import annotations

from rich.segment import Segment
from rich.style import Style
from textual.events import Click
from textual.reactive import reactive
from textual.strip import Strip
from textual.widget import Widget

from dallm.tui import images
from dallm.tui.model import Sample


class Thumbnail(Widget):
    """Shows one sample grid: the latest, unless the user stepped back (`older`/`newer`).

    Half-blocks are drawn as ordinary cells. Sixel and Kitty images are written to the terminal
    after Textual has drawn the (blank) cells they cover, and again when the widget moves or
    the sample changes.
    """

    DEFAULT_CSS = """
    Thumbnail { height: 1fr; min-height: 3; }
    """

    index: reactive[int] = reactive(-1)  # -1: follow the latest sample

    def __init__(self, mode: images.ImageMode = "halfblock", **kwargs) -> None:
        super().__init__(**kwargs)
        self.mode = mode
        self.samples: list[Sample] = []
        self._job: int | None = None
        self._cache_key: object = None
        self._lines: list[Strip] = []
        self._graphics: tuple[object, str, int] | None = (
            None  # (key, escape sequence, left pad) of the last image
        )

    # -- data -----------------------------------------------------------------------------------

    def show(self, job: int | None, samples: list[Sample]) -> None:
        if job != self._job:
            self._job = job
            self.index = -1
        if samples is not self.samples or len(samples) != getattr(self, "_n", -1):
            self.samples = samples
            self._n = len(samples)
            if self.index >= len(samples):
                self.index = -1
            self.refresh()

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
        self.refresh()

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

    def render_line(self, y: int) -> Strip:
        width, height = self.size
        sample = self.current
        base = self.rich_style  # the background under every cell, as in Chart.render_line
        key = (id(sample), width, height, self.index, self.mode, base)
        if key != self._cache_key:
            self._cache_key = key
            self._lines = [line.apply_style(base) for line in self._draw(sample, width, height)]
        if y == 1 and self.mode in ("sixel", "kitty"):
            # Textual just (re)painted the blank cells under the image: draw it again over them.
            self.call_after_refresh(self._write_graphics, sample, width, height - 1)
        return self._lines[y] if y < len(self._lines) else Strip.blank(width, base)

    def _draw(self, sample: Sample | None, width: int, height: int) -> list[Strip]:
        caption = Strip([Segment(self.caption(), Style(dim=True))]).crop_extend(0, width, None)
        body_h = height - 1
        if sample is not None and sample.texts:  # an LLM job: its latest generations as text
            return [caption, *_text_strips(sample.texts, width, body_h)]
        if sample is None or body_h < 1 or self.mode == "none":
            return [caption]
        image = images.decode(sample.png)
        if image is None:
            return [caption, Strip([Segment("(unreadable image)", Style(dim=True))])]
        if self.mode == "halfblock":
            return [caption, *images.halfblock_strips(image, width, body_h)]
        return [caption]

    def _write_graphics(self, sample: Sample | None, width: int, height: int) -> None:
        """Sixel/Kitty: draw the image over this widget's cells, below the caption."""
        driver = self.app._driver
        if (
            driver is None
            or not self.is_mounted
            or self.app.is_headless
            or self.screen is not self.app.screen
        ):
            return
        if sample is None or height < 1 or sample.texts:
            if self.mode == "kitty":
                driver.write(images.kitty_delete())
            return
        key = (id(sample), width, height)
        if self._graphics is None or self._graphics[0] != key:
            image = images.decode(sample.png)
            if image is None:
                return
            fitted, cols, rows = images.fit_cells(image, width, height, images.cell_pixels())
            # Kitty stretches the image over the cells it is given: give it the fitted box's cells.
            seq = images.kitty(image, cols, rows) if self.mode == "kitty" else images.sixel(fitted)
            self._graphics = (key, seq, (width - cols) // 2)  # centred, as the half-blocks are
        _, seq, pad = self._graphics
        if self.mode == "kitty":
            seq = images.kitty_delete() + seq
        region = self.content_region
        driver.write(f"\x1b7\x1b[{region.y + 2};{region.x + 1 + pad}H{seq}\x1b8")
        driver.flush()


def _text_strips(texts: list[str], width: int, height: int) -> list[Strip]:
    """Generated texts, one after another (alternating colours), wrapped to `width`, cut at `height`."""
    import textwrap

    lines: list[Strip] = []
    for i, text in enumerate(texts):
        style = Style(color="green" if i % 2 == 0 else "cyan")
        for part in textwrap.wrap(text, max(width, 1)) or [""]:
            lines.append(Strip([Segment(part, style)]).crop_extend(0, width, None))
    return lines[:height]
