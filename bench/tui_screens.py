"""Screenshots of each dallm-tui view for docs/tui.md: the demo daemon, headless at 160x48 with
half-block images, saved as SVG by Textual and converted to PNG when `rsvg-convert` is installed
(apt-get install librsvg2-bin).

    .venv/bin/python bench/tui_screens.py [--out docs/screens]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from dallm.tui.app import DallmApp  # noqa: E402
from dallm.tui.demo import demo_connection  # noqa: E402
from dallm.tui.gallery import GalleryScreen  # noqa: E402
from dallm.tui.thumbnail import SampleCell  # noqa: E402
from dallm.tui.widgets import ConnectionBar  # noqa: E402

# (file name, keys pressed from the main view, what it shows)
VIEWS = [
    ("main", [], "queue, CS-Fluctuation (log) + KID with error bars, thumbnail, checkpoints, log"),
    ("chart-cursor", ["z", "comma", "e"], "zoomed in, cursor reading both charts, smoothing 0.6"),
    ("loss", ["t"], "loss + CS"),
    ("gallery", ["g"], "sample gallery: base, turning point, latest"),
    ("help", ["question_mark"], "help with every key"),
]


async def shoot(out: Path, size: tuple[int, int]) -> list[Path]:
    saved = []
    for name, keys, _ in VIEWS:
        app = DallmApp(demo_connection(points=400), images_mode="halfblock", poll_timeout=0.05)
        async with app.run_test(size=size) as pilot:
            deadline = time.monotonic() + 30
            while not (
                app.query_one(ConnectionBar).connected and 1 in app.model.data and app.model.data[1].loaded
            ):
                if time.monotonic() > deadline:
                    raise SystemExit("the demo did not load")
                await pilot.pause(0.05)
            while len(app.query(SampleCell)) < 4 and time.monotonic() < deadline:
                await pilot.pause(0.05)
            await pilot.press(*keys)
            if isinstance(app.screen, GalleryScreen):
                while len(app.screen.query(SampleCell)) < 12 and time.monotonic() < deadline:
                    await pilot.pause(0.05)
            await pilot.pause(0.5)
            path = out / f"tui-{name}.svg"
            app.save_screenshot(filename=path.name, path=str(out))
            saved.append(path)
    return saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("docs/screens"))
    p.add_argument("--width", type=int, default=160)
    p.add_argument("--height", type=int, default=48)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    svgs = asyncio.run(shoot(args.out, (args.width, args.height)))
    convert = shutil.which("rsvg-convert")
    for svg in svgs:
        if convert:
            png = svg.with_suffix(".png")
            subprocess.run([convert, "-o", str(png), str(svg)], check=True)
            svg.unlink()
            # A terminal has few colours: a 128-colour palette keeps the docs small.
            with Image.open(png) as im:
                small = im.convert("RGB").quantize(128)
            small.save(png, optimize=True)
            print(png)
        else:
            print(svg, "(no rsvg-convert: kept as SVG)")


if __name__ == "__main__":
    main()
