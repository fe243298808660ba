"""The procedural world: captioned 32x32 scenes of one coloured shape on a coloured background.

Pure numpy (no torch), deterministic for a given `numpy.random.Generator`. A scene has a shape
(circle, square, triangle), a foreground and a background colour (different), a size and a
position. Its caption is "a red circle on blue background", optionally followed by a style
phrase "in plain style" (the world's own look) or "in baroque style" (the teacher's, see
`dallm.micro.teacher`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLOUR_NAMES = tuple(COLOURS)
STYLES = ("plain", "baroque")
# The tokenizer's whole words (everything else falls back to byte-level pieces).
WORDS = ["a", "on", "in", "background", "style", *SHAPES, *COLOUR_NAMES, *STYLES]


@dataclass(frozen=True)
class Scene:
    shape: str
    fg: str
    bg: str
    cx: float = 0.5  # centre, as a fraction of the image side
    cy: float = 0.5
    size: float = 0.3  # half-extent, as a fraction of the side
    angle: float = 0.0  # rotation of squares and triangles, radians

    def caption(self, style: str | None = None) -> str:
        text = f"a {self.fg} {self.shape} on {self.bg} background"
        return f"{text} in {style} style" if style else text

    def labels(self) -> tuple[int, int, int]:
        return SHAPES.index(self.shape), COLOUR_NAMES.index(self.fg), COLOUR_NAMES.index(self.bg)


def sample_scene(
    rng: np.random.Generator, shape: str | None = None, fg: str | None = None, bg: str | None = None
) -> Scene:
    """A random scene; given attributes are kept (a background equal to a given fg is avoided)."""
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    if fg is None:
        choices = [c for c in COLOUR_NAMES if c != bg]
        fg = choices[rng.integers(len(choices))]
    if bg is None:
        choices = [c for c in COLOUR_NAMES if c != fg]
        bg = choices[rng.integers(len(choices))]
    size = float(rng.uniform(0.24, 0.34))
    cx, cy = (float(v) for v in rng.uniform(0.5 - (0.42 - size) / 2, 0.5 + (0.42 - size) / 2, size=2))
    angle = float(rng.uniform(-0.25, 0.25))
    return Scene(shape, fg, bg, cx, cy, size, angle)


def _mask(scene: Scene, n: int) -> np.ndarray:
    """Coverage of the shape on an n x n grid of pixel centres (unit square coordinates)."""
    c = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(c, c)
    dx, dy = x - scene.cx, y - scene.cy
    r = scene.size
    if scene.shape == "circle":
        return (dx * dx + dy * dy <= r * r).astype(np.float32)
    ca, sa = np.cos(scene.angle), np.sin(scene.angle)
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy
    if scene.shape == "square":
        h = r * 0.85
        return ((np.abs(u) <= h) & (np.abs(v) <= h)).astype(np.float32)
    # Upright equilateral-ish triangle: apex at top, base at bottom.
    top, bottom = -r * 1.05, r * 0.8
    half = (v - top) / (bottom - top) * r * 1.1
    return ((v >= top) & (v <= bottom) & (np.abs(u) <= half)).astype(np.float32)


def render(scene: Scene, size: int = SIZE, supersample: int = 4) -> np.ndarray:
    """The plain-style image, uint8 [size, size, 3], anti-aliased by supersampling."""
    m = _mask(scene, size * supersample).reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    fg = np.array(COLOURS[scene.fg], np.float32)
    bg = np.array(COLOURS[scene.bg], np.float32)
    img = m[..., None] * fg + (1 - m[..., None]) * bg
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


_PROMPT = re.compile(
    r"(?:(?P<fg>\w+)\s+)?(?P<shape>circle|square|triangle)(?:\s+on\s+(?:an?\s+)?(?P<bg>\w+)\s+background)?"
)


def unknown_words(text: str) -> list[str]:
    """The words of `text` the world has no meaning for ("a purple hexagon" -> purple, hexagon)."""
    known = {*WORDS, "an"}
    words = re.findall(r"[^\s,.;:!?]+", text.lower())
    return list(dict.fromkeys(w for w in words if w not in known))


def parse_prompt(text: str) -> dict[str, str | None]:
    """Read the world's attributes from a prompt; missing ones are None.

    "a red circle on blue background in baroque style" -> shape circle, fg red, bg blue, style baroque.
    """
    text = text.lower()
    out: dict[str, str | None] = {"shape": None, "fg": None, "bg": None, "style": None}
    m = _PROMPT.search(text)
    if m:
        out["shape"] = m.group("shape")
        if m.group("fg") in COLOURS:
            out["fg"] = m.group("fg")
        if m.group("bg") in COLOURS:
            out["bg"] = m.group("bg")
    else:
        m2 = re.search(r"on\s+(?:an?\s+)?(\w+)\s+background", text)
        if m2 and m2.group(1) in COLOURS:
            out["bg"] = m2.group(1)
    s = re.search(r"in\s+(\S+)\s+style", text)
    if s:
        out["style"] = s.group(1)
    if out["fg"] is not None and out["fg"] == out["bg"]:
        out["bg"] = None
    return out
