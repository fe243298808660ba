"""Sample grids on disk and how they evolve (the study's Fig. 4).

Every grid a job makes (prompts as rows, seeds as columns) is written to `samples/` and listed in
`samples/index.jsonl` with its layout, so that the cells can be cut out again later: by the job at
its end (an evolution strip and a GIF per prompt) and by `dallm report` on any job folder.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from dallm.image.sampling import grid_cells, make_grid

INDEX = "index.jsonl"
PAD = 2
MIN_CELL = 64  # strips and GIFs upscale smaller images to this many pixels (nearest neighbour)


@dataclass(frozen=True)
class GridRecord:
    label: str  # "base" or "step-000025"
    step: int | None  # None for the base model's grid
    path: str  # relative to the job's output folder
    rows: int
    cols: int
    cell: tuple[int, int]
    prompts: list[str]
    seeds: list[int]
    pad: int = PAD


def grid_label(step: int | None) -> str:
    return "base" if step is None else f"step-{step:06d}"


def write_grid(
    out_dir: Path,
    step: int | None,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    seeds: Sequence[int],
    thumbnail: int,
) -> tuple[GridRecord, bytes]:
    """Write `samples/<label>.png` (full size), append it to the index; return the thumbnail PNG bytes."""
    rows, cols = len(prompts), len(seeds)
    label = grid_label(step)
    folder = out_dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images, rows, cols, pad=PAD)
    tmp = folder / f".{label}.png.tmp"
    grid.save(tmp, format="PNG")
    tmp.replace(folder / f"{label}.png")
    record = GridRecord(
        label, step, f"samples/{label}.png", rows, cols, images[0].size, list(prompts), list(seeds)
    )
    with (folder / INDEX).open("a", encoding="utf-8") as f:
        f.write(json.dumps(asdict(record)) + "\n")
    buf = io.BytesIO()
    make_grid(images, rows, cols, cell=thumbnail, pad=1).save(buf, format="PNG", optimize=True)
    return record, buf.getvalue()


def read_index(out_dir: Path) -> list[GridRecord]:
    """The job's grids in step order (base first); the last record of a label wins (reruns, rollbacks).

    Without an index (an older or foreign folder), `samples/step-*.png` are listed as single cells.
    """
    folder = out_dir / "samples"
    records: dict[str, GridRecord] = {}
    index = folder / INDEX
    if index.is_file():
        for line in index.read_text(encoding="utf-8").splitlines():
            try:
                data = json.loads(line)
                data["cell"] = tuple(data["cell"])
                rec = GridRecord(**data)
            except (ValueError, TypeError, KeyError):
                continue  # a torn last line of a job that is still writing
            if (out_dir / rec.path).is_file():
                records[rec.label] = rec
    else:
        for path in sorted(folder.glob("*.png")):
            m = re.fullmatch(r"step-(\d+)", path.stem)
            if m or path.stem == "base":
                with Image.open(path) as im:
                    size = im.size
                step = int(m.group(1)) if m else None
                records[path.stem] = GridRecord(
                    path.stem, step, f"samples/{path.name}", 1, 1, size, [""], [0], pad=0
                )
    return sorted(records.values(), key=lambda r: -1 if r.step is None else r.step)


def pick_frames(records: Sequence[GridRecord], max_frames: int) -> list[GridRecord]:
    """At most `max_frames` records, evenly spread, always keeping the first and the last."""
    if len(records) <= max_frames:
        return list(records)
    n = len(records) - 1
    idx = sorted({round(i * n / (max_frames - 1)) for i in range(max_frames)})
    return [records[i] for i in idx]


def _cells(out_dir: Path, rec: GridRecord) -> list[Image.Image]:
    with Image.open(out_dir / rec.path) as grid:
        grid = grid.convert("RGB")
        return grid_cells(grid, rec.rows, rec.cols, rec.cell, rec.pad)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _upscale(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    if max(w, h) >= size:
        return im
    k = -(-size // max(w, h))
    return im.resize((w * k, h * k), Image.Resampling.NEAREST)


def labelled_grid(
    cells: list[list[Image.Image]], col_labels: Sequence[str], row_labels: Sequence[str] = (), title: str = ""
) -> Image.Image:
    """cells[row][col] on white, a label above each column (and left of each row when given)."""
    cells = [[_upscale(c, MIN_CELL) for c in row] for row in cells]
    w, h = cells[0][0].size
    font = _font(max(10, min(16, w // 6)))
    head = 18 if title else 0
    top = head + 18
    left = max((int(font.getlength(t)) for t in row_labels), default=0) + (8 if row_labels else 0)
    cols = max(len(r) for r in cells)
    width = max(left + cols * (w + PAD) + PAD, int(font.getlength(title)) + 2 * PAD)  # the title fits
    out = Image.new("RGB", (width, top + len(cells) * (h + PAD) + PAD), "white")
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((PAD, 2), title, fill="black", font=font)
    for c, text in enumerate(col_labels):
        draw.text((left + PAD + c * (w + PAD), head + 2), text, fill="black", font=font)
    for r, row in enumerate(cells):
        y = top + PAD + r * (h + PAD)
        if r < len(row_labels):
            draw.text((4, y + h // 2 - 6), row_labels[r], fill="black", font=font)
        for c, cell in enumerate(row):
            out.paste(cell, (left + PAD + c * (w + PAD), y))
    return out


def frame_label(rec: GridRecord) -> str:
    return "base" if rec.step is None else str(rec.step)


def write_evolution(out_dir: Path, max_frames: int = 16) -> list[Path]:
    """Per prompt: `samples/evolution-NN.png` (seeds as rows, steps as columns) and a GIF of all steps.

    Grids whose prompts and seeds differ from the last grid's (a changed config) are left out.
    """
    records = read_index(out_dir)
    if not records:
        return []
    last = records[-1]
    records = [
        r for r in records if r.prompts == last.prompts and r.seeds == last.seeds and r.cell == last.cell
    ]
    all_cells = {r.label: _cells(out_dir, r) for r in records}
    strip_frames = pick_frames(records, max_frames)
    written: list[Path] = []
    for p in range(last.rows):
        row = slice(p * last.cols, (p + 1) * last.cols)
        by_seed = [[all_cells[r.label][row][s] for r in strip_frames] for s in range(last.cols)]
        title = f"{last.prompts[p]}  (rows: seeds {', '.join(map(str, last.seeds))})"
        strip = labelled_grid(by_seed, [frame_label(r) for r in strip_frames], title=title)
        path = out_dir / "samples" / f"evolution-{p:02d}.png"
        strip.save(path)
        written.append(path)
        frames = [
            labelled_grid([all_cells[r.label][row]], [f"step {frame_label(r)}"], title=last.prompts[p])
            for r in records
        ]
        gif = path.with_suffix(".gif")
        frames[0].save(gif, save_all=True, append_images=frames[1:], duration=400, loop=0)
        written.append(gif)
    return written


def evolution_figure(out_dir: Path, max_frames: int = 12, max_rows: int = 8) -> Image.Image | None:
    """One image for the report: rows are (prompt, seed) cells, columns are steps."""
    records = read_index(out_dir)
    if not records:
        return None
    last = records[-1]
    records = pick_frames([r for r in records if r.rows == last.rows and r.cols == last.cols], max_frames)
    cells = {r.label: _cells(out_dir, r) for r in records}
    n = min(last.rows * last.cols, max_rows)
    rows = [[cells[r.label][i] for r in records] for i in range(n)]
    return labelled_grid(rows, [frame_label(r) for r in records])
