"""Sample images in a terminal through textual-image: Sixel or Kitty graphics where the terminal says
it draws them, unicode half-blocks everywhere else.

textual-image decides by asking the terminal (DA1 for Sixel, a Kitty graphics query, the cell size in
pixels), not by guessing from TERM. It must ask before Textual starts (Textual's input thread takes
the answers afterwards): `detect_mode` is called from `main` before the app runs, and importing
`textual_image.widget` (which this module does lazily) measures the cell size.

tmux: the queries reach tmux itself. A tmux built with sixel support answers DA1 with Sixel and draws
Sixel in its panes, so Sixel works there. textual-image 0.12 (the newest for Python 3.11; 0.13+ needs
3.12) does not wrap Kitty graphics in tmux's passthrough, so Kitty-under-tmux gets half-blocks.

Sixel is drawn by `tui/compat.py`'s subclass of textual-image's widget, which leaves no stale pixels
behind and cannot be drawn in the wrong place (what xterm showed with the library's own).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Literal

from PIL import Image

if TYPE_CHECKING:
    from textual.widget import Widget

ImageMode = Literal["auto", "sixel", "kitty", "halfblock", "none"]
IMAGE_MODES: tuple[str, ...] = ("auto", "sixel", "kitty", "halfblock", "none")


def mode_of(renderable: type) -> ImageMode:
    """Our mode for the renderable class textual-image chose. Its last resort, plain unicode blocks
    (for output that is not a terminal), is coarser than half-blocks: half-blocks then."""
    from textual_image.renderable import SixelImage, TGPImage

    if renderable is SixelImage:
        return "sixel"
    if renderable is TGPImage:
        return "kitty"
    return "halfblock"


def detect_mode() -> ImageMode:
    """What the terminal draws, as textual-image found out (it queries once, on first import)."""
    import textual_image.renderable

    return mode_of(textual_image.renderable.Image)


def resolve_mode(requested: str) -> ImageMode:
    """The mode to draw with. Call it before Textual starts: it may ask the terminal (detection, and
    the cell size that textual-image measures when its widgets are first imported)."""
    if requested not in IMAGE_MODES:
        raise ValueError(f"--images: expected one of {', '.join(IMAGE_MODES)}, got {requested!r}")
    mode: ImageMode = detect_mode() if requested == "auto" else requested  # type: ignore[assignment]
    widget_class(mode)  # imports textual_image.widget now, which measures the cell size
    return mode


def widget_class(mode: ImageMode) -> type[Widget] | None:
    """The textual-image widget that draws `mode` (None: no images)."""
    if mode == "none":
        return None
    from textual_image.widget import HalfcellImage, TGPImage

    if mode == "auto":
        mode = detect_mode()
    if mode == "sixel":
        from dallm.tui.compat import CellSixelImage

        return CellSixelImage
    return {"kitty": TGPImage}.get(mode, HalfcellImage)


def decode(png: bytes) -> Image.Image | None:
    """The image in `png`, or None when the bytes are not a readable image."""
    try:
        image = Image.open(io.BytesIO(png))
        image.load()
    except Exception:
        return None
    return image.convert("RGB")


def grid_cells(image: Image.Image, rows: int, cols: int) -> list[Image.Image] | None:
    """The row-major cells of a sample grid (made by `sampling.make_grid` with a 1-pixel pad), or
    None when the image cannot be such a grid."""
    if rows < 1 or cols < 1:
        return None
    w = (image.width - (cols + 1)) // cols
    h = (image.height - (rows + 1)) // rows
    if w < 1 or h < 1:
        return None
    # sampling.grid_cells does the same but imports torch: too slow for the TUI's start.
    return [
        image.crop((1 + c * (w + 1), 1 + r * (h + 1), 1 + c * (w + 1) + w, 1 + r * (h + 1) + h))
        for r in range(rows)
        for c in range(cols)
    ]
