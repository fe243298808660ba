"""`dallm report`: plots from a synthetic job folder, and clear errors for bad metrics files."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dallm.cli import main
from dallm.eval.sample_grids import labelled_grid, read_index, write_evolution, write_grid
from dallm.image.sampling import to_pil
from dallm.report.job import ReportError, cs_fluct_series, read_metrics, read_turning_point, write_report


def synthetic_job(folder: Path, steps: int = 200, turning: int | None = 120, samples: bool = True) -> Path:
    rnd = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "metrics.jsonl").open("w") as f:
        for s in range(1, steps + 1):
            row = {
                "step": s,
                "loss": 0.1 + 0.5 * math.exp(-s / 30) + 0.05 * rnd.random(),
                "lr": 1e-4,
                "grad_norm": 1 + rnd.random(),
                "cs": 0.01 * (1 - math.exp(-s / 50)),
            }
            if s >= 10:
                row["cs_fluct"] = 1e-6 * (1 + math.sin(s / 15)) + 1e-8
            f.write(json.dumps(row) + "\n")
            if s % 25 == 0:  # evaluation rows arrive separately for the same step
                kid = {"kid_train": 0.05 * math.exp(-s / 80), "kid_val": 0.06 * math.exp(-s / 100) + 0.01}
                kid |= {"kid_base": 0.05 * (1 - math.exp(-s / 60)), "kid_train_std": 0.004}
                kid |= {"kid_val_std": 0.005, "kid_base_std": 0.003, "eval_seconds": 2.0}
                kid |= {"base_kid_train": 0.045, "base_kid_val": 0.05}
                f.write(json.dumps({"step": s, **kid}) + "\n")
    if turning is not None:
        result = {
            "reason": "early_stop",
            "final_step": steps,
            "result_step": turning,
            "turning_point": turning,
        }
        (folder / "result.json").write_text(json.dumps(result))
    if samples:
        gen = torch.Generator().manual_seed(0)
        base = torch.rand(6, 3, 16, 16, generator=gen)
        for step in [None, *range(25, steps + 1, 25)]:
            shade = 0 if step is None else step / steps
            images = to_pil(base * (1 - shade) + shade * torch.tensor([0.8, 0.6, 0.1])[:, None, None])
            write_grid(folder, step, images, ["a red circle", "a cat", "a blue square"], [0, 1], thumbnail=32)
    return folder


def pixels_near(path: Path, colour: str, tolerance: int = 40) -> int:
    """How many pixels of the PNG are within `tolerance` (per channel) of a matplotlib colour."""
    from matplotlib.colors import to_rgb

    want = np.array([round(255 * c) for c in to_rgb(colour)])
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    return int((np.abs(rgb - want).max(axis=-1) <= tolerance).sum())


def test_report_writes_all_plots(tmp_path: Path) -> None:
    job = synthetic_job(tmp_path / "job")
    results = write_report(job)
    assert set(results) == {"loss", "cs", "kid", "samples"}
    for name, path in results.items():
        assert isinstance(path, Path), f"{name} skipped: {path}"
        with Image.open(path) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    assert results["kid"] == job / "report" / "kid.png"
    # What is drawn, not only that a file exists: the curves in their colours, the turning point.
    assert pixels_near(results["loss"], "tab:blue") > 500
    assert pixels_near(results["kid"], "tab:orange") > 200 and pixels_near(results["kid"], "tab:blue") > 200
    assert pixels_near(results["cs"], "tab:red", tolerance=20) > 50  # the turning point's line
    with Image.open(results["samples"]) as im:
        colours = np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)
    assert len(colours) > 50  # the sample grids, not a blank canvas


def test_report_cli_out_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = synthetic_job(tmp_path / "job", samples=False, turning=None)
    assert main(["report", str(job), "--out", str(tmp_path / "plots"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["written"]) == {"loss", "cs", "kid"}
    assert "samples" in out["skipped"]
    assert (tmp_path / "plots" / "cs.png").is_file()


def test_report_skips_what_was_not_logged(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    (job / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n')
    results = write_report(job)
    assert isinstance(results["loss"], Path) and pixels_near(results["loss"], "tab:blue") > 100
    assert "kid" in str(results["kid"]) and isinstance(results["kid"], str)
    assert isinstance(results["cs"], str) and isinstance(results["samples"], str)
    assert sorted(p.name for p in (job / "report").iterdir()) == ["loss.png"]  # nothing blank written


def test_rows_merge_and_rollback_supersedes(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": float(s)} for s in range(1, 6)]
    lines += [{"step": 5, "kid_val": 0.5}, {"step": 3, "loss": 30.0}, {"step": 4, "loss": 40.0}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 5, "lo')  # torn last line
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["loss"] == 30.0 and rows[3]["loss"] == 40.0
    assert all("kid_val" not in r for r in rows)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"metrics.jsonl: no such file"),
        ("", r"metrics.jsonl: empty"),
        ("\n\n", r"metrics.jsonl: empty"),
        ('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": \n{"step": 3}\n', r"metrics.jsonl:2: not valid JSON"),
        ('{"step": 1}\n[1, 2]\n', r"metrics.jsonl:2: expected a JSON object"),
        ('{"loss": 0.5}\n', r"metrics.jsonl:1: expected a JSON object with a non-negative integer \"step\""),
        ('{"step": "3"}\n', r"metrics.jsonl:1: expected"),
    ],
)
def test_bad_metrics_files(tmp_path: Path, content: str | None, message: str) -> None:
    job = tmp_path / "job"
    job.mkdir()
    if content is not None:
        (job / "metrics.jsonl").write_text(content)
    with pytest.raises(ReportError, match=message):
        write_report(job)


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"dallm report: {tmp_path / 'nope'}: no such job folder"
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "metrics.jsonl").write_text("not json\n")
    assert main(["report", str(tmp_path / "job")]) == 1
    assert "metrics.jsonl:1: not valid JSON" in capsys.readouterr().err


def test_turning_point_from_result_json(tmp_path: Path) -> None:
    assert read_turning_point(tmp_path) is None
    done = {"reason": "early_stop", "final_step": 55, "result_step": 40}
    (tmp_path / "result.json").write_text(json.dumps({**done, "turning_point": 40}))
    assert read_turning_point(tmp_path) == 40
    (tmp_path / "result.json").write_text(json.dumps({**done, "turning_point": None}))
    assert read_turning_point(tmp_path) is None
    # One format (ResultFile): anything else is not a result file.
    (tmp_path / "result.json").write_text(json.dumps({**done, "turning_step": 7}))
    assert read_turning_point(tmp_path) is None
    (tmp_path / "result.json").write_text('{"turning_point": 40')
    assert read_turning_point(tmp_path) is None


def test_evolution_strips_and_gif(tmp_path: Path) -> None:
    job = synthetic_job(tmp_path / "job", steps=100)
    records = read_index(job)
    assert [r.step for r in records] == [None, 25, 50, 75, 100]
    written = write_evolution(job)
    assert [p.name for p in written] == [f"evolution-{i:02d}.{e}" for i in range(3) for e in ("png", "gif")]
    with Image.open(job / "samples" / "evolution-00.gif") as gif:
        assert gif.n_frames == 5
    with Image.open(job / "samples" / "evolution-01.png") as strip:
        assert strip.size[0] > 5 * 64 and strip.size[1] > 2 * 64  # 5 frames x 2 seeds, upscaled


def test_final_and_turning_kid_from_result_json(tmp_path: Path) -> None:
    from dallm.report.job import merge_final_eval, read_result, turning_kid

    job = synthetic_job(tmp_path / "job", steps=110, samples=False, turning=60)
    ev = {"kid_val": 0.02, "kid_val_std": 0.001, "turning_kid_val": 0.03, "eval_seconds_total": 5.0}
    done = {"reason": "stopped", "final_step": 110, "result_step": 60, "turning_point": 60, "eval": ev}
    (job / "result.json").write_text(json.dumps(done))
    result = read_result(job)
    rows = merge_final_eval(read_metrics(job / "metrics.jsonl"), result)
    assert rows[-1]["step"] == 110 and rows[-1]["kid_val"] == 0.02 and rows[-1]["loss"] > 0
    assert "eval_seconds_total" not in rows[-1]
    assert turning_kid(result) == {"kid_val": 0.03}
    assert isinstance(write_report(job)["kid"], Path)


def test_cs_fluct_is_placed_on_the_step_it_describes() -> None:
    rows = [
        {"step": 1, "cs": 0.1},
        {"step": 7, "cs": 0.2, "cs_fluct": 3.0, "cs_fluct_step": 1.0},
        {"step": 8, "cs": 0.2, "cs_fluct": float("nan"), "cs_fluct_step": 2.0},
        {"step": 9, "cs_fluct": 2.0},  # an older log without cs_fluct_step: its own step
    ]
    assert cs_fluct_series(rows) == ([1.0, 9], [3.0, 2.0])


def test_a_long_title_widens_the_grid_instead_of_being_cut() -> None:
    cell = Image.new("RGB", (8, 8), "red")
    title = "a red circle on blue background in <s1><s2> style  (rows: seeds 0, 1)"
    short = labelled_grid([[cell, cell]], ["base", "50"])
    long = labelled_grid([[cell, cell]], ["base", "50"], title=title)
    assert long.width > short.width
    # the title's last pixels lie inside the image: the rightmost dark column is before the edge
    dark = [x for x in range(long.width) if any(sum(long.getpixel((x, y))) < 200 for y in range(16))]
    assert dark and max(dark) < long.width - 1
