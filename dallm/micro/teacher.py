"""The teacher: a procedural "baroque" renderer, the stand-in for the larger model.

It draws the same scenes as the world (so prompts are parallel: "a red circle on blue background
in baroque style") in a look the micro model never saw: a warm varnish tint, painterly brush
texture, a dark vignette and a gold frame. Pure numpy, deterministic for a given generator.
"""

from __future__ import annotations

import numpy as np

from dallm.micro.world import SIZE, WORDS, Scene, parse_prompt, render, sample_scene, unknown_words

GOLD = np.array((212, 170, 60), np.float32)
DARK_GOLD = np.array((110, 75, 25), np.float32)
FRAME = 3  # frame width in pixels at 32x32


def _upsample(field: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a small square field to size x size."""
    n = field.shape[0]
    pos = (np.arange(size) + 0.5) / size * (n - 1)
    i0 = np.clip(np.floor(pos).astype(int), 0, n - 2)
    t = pos - i0
    rows = field[i0] * (1 - t)[:, None] + field[i0 + 1] * t[:, None]
    return rows[:, i0] * (1 - t)[None, :] + rows[:, i0 + 1] * t[None, :]


def baroque(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply the baroque look to a uint8 [S, S, 3] image."""
    s = img.shape[0]
    x = img.astype(np.float32)
    # Warm varnish: pull towards a sepia version of the image.
    lum = x @ np.array([0.299, 0.587, 0.114], np.float32)
    sepia = lum[..., None] * np.array([1.08, 0.88, 0.62], np.float32)
    x = 0.72 * x + 0.28 * sepia
    # Painterly texture: blotchy low-frequency light plus diagonal brush strokes.
    blotch = _upsample(rng.normal(0, 1, size=(6, 6)).astype(np.float32), s)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    strokes = np.sin((xx + yy) * (2 * np.pi / 5.0) + phase + 1.5 * blotch)
    x = x * (1 + 0.10 * blotch[..., None] + 0.07 * strokes[..., None])
    # Dark vignette.
    c = (s - 1) / 2
    r2 = ((xx - c) ** 2 + (yy - c) ** 2) / (c * c * 2)
    x = x * (1 - 0.75 * r2[..., None]) + 8 * r2[..., None]
    # Gold frame with a beaded pattern and a dark inner edge.
    f = max(1, round(FRAME * s / SIZE))
    border = np.minimum(np.minimum(xx, yy), np.minimum(s - 1 - xx, s - 1 - yy))
    along = np.where(np.minimum(xx, s - 1 - xx) < np.minimum(yy, s - 1 - yy), yy, xx)
    bead = 0.5 + 0.5 * np.cos(along * (2 * np.pi / 3.0))
    shade = np.clip(1.0 - np.abs(border - (f - 1) / 2) / f, 0, 1)
    gold = DARK_GOLD + (GOLD - DARK_GOLD) * (0.55 * shade + 0.45 * bead)[..., None]
    inner = border == f
    x = np.where((border < f)[..., None], gold, x)
    x = np.where(inner[..., None], x * 0.35 + DARK_GOLD * 0.2, x)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def render_teacher(scene: Scene, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    return baroque(render(scene, size), rng)


def synth(prompt: str, n: int, seed: int = 0, size: int = SIZE) -> list[tuple[np.ndarray, str]]:
    """n teacher images for a prompt: (uint8 image, caption of what was drawn).

    Attributes the prompt names are kept; the others are drawn at random. The caption names the
    drawn scene "in baroque style".
    """
    unknown = unknown_words(prompt)
    if unknown:  # drawing random scenes for words the world lacks would pass for an answer
        raise ValueError(
            f"the teacher does not know {', '.join(map(repr, unknown))}; its words: {', '.join(WORDS)}"
        )
    rng = np.random.default_rng(seed)
    attrs = parse_prompt(prompt)
    out = []
    for _ in range(n):
        scene = sample_scene(rng, attrs["shape"], attrs["fg"], attrs["bg"])
        out.append((render_teacher(scene, rng, size), scene.caption("baroque")))
    return out
