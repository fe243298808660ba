"""Sample thumbnails in a terminal: unicode half-blocks everywhere, Sixel or Kitty graphics where the
terminal is known to draw them. Pure functions (PNG bytes in, text or escape sequences out).
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Mapping
from typing import Literal

import numpy as np
from PIL import Image
from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip

ImageMode = Literal["auto", "sixel", "kitty", "halfblock", "none"]
IMAGE_MODES: tuple[str, ...] = ("auto", "sixel", "kitty", "halfblock", "none")

# Terminals that draw Sixel as far as we know; matched against TERM and TERM_PROGRAM.
_SIXEL_TERMS = ("foot", "mlterm", "yaft", "contour", "wezterm", "xterm-sixel")


def detect_mode(env: Mapping[str, str] | None = None) -> ImageMode:
    """Pick an image mode conservatively: half-blocks unless the terminal is known to do better.

    tmux and screen pass neither graphics protocol through reliably, nor does an SSH session whose
    terminal we cannot identify, so those get half-blocks.
    """
    env = os.environ if env is None else env
    term = env.get("TERM", "").lower()
    program = env.get("TERM_PROGRAM", "").lower()
    if env.get("TMUX") or term.startswith(("tmux", "screen")) or program == "tmux":
        return "halfblock"
    if term in ("dumb", ""):
        return "none"
    if env.get("KITTY_WINDOW_ID") or term == "xterm-kitty" or program in ("ghostty", "kitty"):
        return "kitty"
    if program == "wezterm" or any(t in term for t in _SIXEL_TERMS):
        return "sixel"
    return "halfblock"


def resolve_mode(requested: str, env: Mapping[str, str] | None = None) -> ImageMode:
    if requested not in IMAGE_MODES:
        raise ValueError(f"--images: expected one of {', '.join(IMAGE_MODES)}, got {requested!r}")
    return detect_mode(env) if requested == "auto" else requested  # type: ignore[return-value]


def cell_pixels(default: tuple[int, int] = (10, 20)) -> tuple[int, int]:
    """(width, height) of one terminal cell in pixels, from TIOCGWINSZ where the terminal says."""
    import fcntl
    import struct
    import termios

    for fd in (2, 1, 0):
        try:
            rows, cols, xpix, ypix = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
        except OSError:
            continue
        if rows and cols and xpix and ypix:
            return max(1, xpix // cols), max(1, ypix // rows)
    return default


def decode(png: bytes) -> Image.Image | None:
    try:
        image = Image.open(io.BytesIO(png))
        image.load()
    except Exception:
        return None
    return image.convert("RGB")


def fit(image: Image.Image, max_w: int, max_h: int) -> Image.Image:
    """Scale to fit a max_w x max_h pixel box, keeping the aspect ratio."""
    w, h = image.size
    scale = min(max_w / w, max_h / h)
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    return image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)


def fit_cells(
    image: Image.Image, cols: int, rows: int, cell: tuple[int, int]
) -> tuple[Image.Image, int, int]:
    """The image fitted to `cols` x `rows` cells of `cell` (w, h) pixels, and the cells it covers."""
    cw, ch = cell
    fitted = fit(image, cols * cw, rows * ch)
    return fitted, min(cols, -(-fitted.width // cw)), min(rows, -(-fitted.height // ch))


def halfblock_strips(image: Image.Image, width: int, height: int) -> list[Strip]:
    """The image in `width` x `height` cells, two pixels per cell (upper half block: fg top, bg bottom).

    Terminal cells are about twice as tall as wide, so one cell = one pixel wide, two pixels tall keeps
    the aspect ratio.
    """
    img = fit(image, width, height * 2)
    w, h = img.size
    if h % 2:
        padded = Image.new("RGB", (w, h + 1))
        padded.paste(img, (0, 0))
        img, h = padded, h + 1
    px = img.load()
    pad_left = (width - w) // 2
    strips = []
    for row in range(0, h, 2):
        segs = [Segment(" " * pad_left)] if pad_left else []
        for x in range(w):
            top, bottom = px[x, row], px[x, row + 1]
            segs.append(Segment("▀", Style.from_color(_rgb(top), _rgb(bottom))))
        strips.append(Strip(Segment.simplify(segs)).crop_extend(0, width, None))
    return strips


def _rgb(p: tuple[int, int, int]):
    from rich.color import Color

    return Color.from_rgb(*p[:3])


def sixel(image: Image.Image, colors: int = 64) -> str:
    """A DCS Sixel sequence for the image (palette quantised to `colors`)."""
    img = image.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    palette = img.getpalette() or []
    w, h = img.size
    data = np.asarray(img, dtype=np.uint8).reshape(h, w)
    out = [f'\x1bP0;1;0q"1;1;{w};{h}']
    for i in np.unique(data):
        r, g, b = palette[3 * i : 3 * i + 3]
        out.append(f"#{i};2;{r * 100 // 255};{g * 100 // 255};{b * 100 // 255}")
    weights = (1 << np.arange(6, dtype=np.uint8))[:, None]
    for band in range(0, h, 6):
        rows = data[band : band + 6]
        band_colors = np.unique(rows)
        for n, c in enumerate(band_colors):
            bits = ((rows == c) * weights[: len(rows)]).sum(axis=0) + 63
            out.append(f"#{c}" + _rle(bits.astype(np.uint8).tobytes().decode("ascii")))
            out.append("$" if n < len(band_colors) - 1 else "-")
    out.append("\x1b\\")
    return "".join(out)


def _rle(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        j = i
        while j < len(s) and s[j] == s[i]:
            j += 1
        n = j - i
        out.append(f"!{n}{s[i]}" if n > 3 else s[i] * n)
        i = j
    return "".join(out)


def kitty(image: Image.Image, cols: int, rows: int, image_id: int = 7) -> str:
    """Kitty graphics protocol: transmit PNG data and display it over `cols` x `rows` cells."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    payload = base64.standard_b64encode(buf.getvalue()).decode("ascii")
    chunks = [payload[i : i + 4096] for i in range(0, len(payload), 4096)] or [""]
    out = []
    for n, chunk in enumerate(chunks):
        more = 1 if n < len(chunks) - 1 else 0
        head = f"a=T,f=100,i={image_id},c={cols},r={rows},q=2,C=1,m={more}" if n == 0 else f"m={more}"
        out.append(f"\x1b_G{head};{chunk}\x1b\\")
    return "".join(out)


def kitty_delete(image_id: int = 7) -> str:
    return f"\x1b_Ga=d,d=i,i={image_id},q=2\x1b\\"
