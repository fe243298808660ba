"""The procedural world, the teacher, the quickstart targets and `dallm synth --model teacher`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dallm.micro.teacher import render_teacher, synth
from dallm.micro.world import COLOUR_NAMES, SHAPES, WORDS, Scene, parse_prompt, render, sample_scene

REPO = Path(__file__).resolve().parents[1]


def test_import_is_light() -> None:
    import subprocess
    import sys

    code = "import sys, dallm.micro; print('torch' in sys.modules); print(int(dallm.micro.feature_dim))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "128"]


def test_scenes_are_deterministic_and_valid() -> None:
    a = [sample_scene(np.random.default_rng(3)) for _ in range(2)]
    assert a[0] == a[1]
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = sample_scene(rng)
        assert s.shape in SHAPES and s.fg in COLOUR_NAMES and s.bg in COLOUR_NAMES and s.fg != s.bg
    img = render(Scene("circle", "red", "blue"))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert tuple(img[16, 16]) == (220, 40, 40) and tuple(img[0, 0]) == (40, 80, 220)


def test_captions_parse_back_and_use_the_vocabulary() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        s = sample_scene(rng)
        for style in (None, "plain", "baroque"):
            cap = s.caption(style)
            assert set(cap.split()) <= set(WORDS)
            p = parse_prompt(cap)
            assert (p["shape"], p["fg"], p["bg"], p["style"]) == (s.shape, s.fg, s.bg, style)
    assert parse_prompt("a red circle on blue background in <s1><s2> style")["style"] == "<s1><s2>"
    assert parse_prompt("something in baroque style") == {
        "shape": None,
        "fg": None,
        "bg": None,
        "style": "baroque",
    }


def test_teacher_keeps_the_scene_and_adds_a_frame() -> None:
    s = Scene("square", "yellow", "black")
    plain = render(s)
    t = render_teacher(s, np.random.default_rng(0))
    assert t.shape == plain.shape
    assert np.abs(t.astype(int) - plain.astype(int)).mean() > 20
    # Gold frame: the border is warm (red > blue) and not the background colour.
    border = np.concatenate([t[0], t[-1], t[:, 0], t[:, -1]]).astype(int)
    assert (border[:, 0] > border[:, 2] + 40).mean() > 0.9
    # The centre still shows the foreground colour family (yellow: red and green high, blue low).
    c = t[14:18, 14:18].reshape(-1, 3).astype(int).mean(0)
    assert c[0] > 120 and c[1] > 100 and c[2] < c[0]


def test_synth_teacher_honours_the_prompt() -> None:
    out = synth("a red triangle in baroque style", 5, seed=0)
    assert len(out) == 5
    assert all(cap.startswith("a red triangle on ") and cap.endswith(" in baroque style") for _, cap in out)
    again = synth("a red triangle in baroque style", 5, seed=0)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(out, again, strict=True))


def test_synth_cli_teacher(tmp_path: Path) -> None:
    from PIL import Image

    from dallm.cli import main

    assert (
        main(["synth", "--model", "teacher", "--prompt", "a blue circle", "-n", "3", "--out", str(tmp_path)])
        == 0
    )
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 3 and Image.open(pngs[0]).size == (32, 32)
    assert pngs[0].with_suffix(".txt").read_text().startswith("a blue circle on ")


def test_quickstart_targets_are_shipped_and_reproducible(tmp_path: Path) -> None:
    from PIL import Image

    from dallm.micro.build import write_quickstart_data

    shipped = REPO / "configs" / "data" / "quickstart"
    write_quickstart_data(tmp_path)
    for split in ("train", "val"):
        names = sorted(p.name for p in (shipped / split).glob("*.png"))
        assert len(names) == 20
        for name in names:
            a = np.asarray(Image.open(shipped / split / name).convert("RGB"))
            b = np.asarray(Image.open(tmp_path / split / name).convert("RGB"))
            assert np.array_equal(a, b), name
            cap = (shipped / split / name).with_suffix(".txt").read_text()
            assert cap.strip().endswith("in <s1><s2> style")


@pytest.mark.parametrize("prompt", ["a circle", "on white background", "in baroque style"])
def test_synth_fills_missing_attributes(prompt: str) -> None:
    ((img, cap),) = synth(prompt, 1, seed=2)
    p = parse_prompt(cap)
    assert None not in (p["shape"], p["fg"], p["bg"]) and img.shape == (32, 32, 3)


@pytest.mark.parametrize(("flag", "value"), [("--threads", "-1"), ("--steps-scale", "0")])
def test_micro_build_refuses_bad_flags_before_building(tmp_path: Path, capsys, flag: str, value: str) -> None:
    from dallm.cli import main

    assert main(["micro", "build", "--out", str(tmp_path / "m"), flag, value]) == 1
    err = capsys.readouterr().err
    assert flag in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()
