"""The image folder: preprocessing, captions, limit, and each bad image case naming its file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from dallm.config import DataConfig
from dallm.engine.training import batch_indices
from dallm.image.data import DataError, load_images, load_training_data


def _cfg(folder: Path, **kw: object) -> DataConfig:
    return DataConfig(dir=folder, instance_prompt="a red circle", **kw)


def test_preprocess_captions_limit(image_dir: Callable[..., Path]) -> None:
    folder = image_dir(n=5, size=24)
    (folder / "img001.txt").write_text("a blue square\n")
    Image.new("RGB", (40, 20), (255, 0, 0)).save(folder / "wide.jpg")
    Image.new("RGB", (20, 20), (0, 255, 0)).save(folder / "zz.webp")
    images, classes = load_training_data(_cfg(folder), resolution=16)
    assert classes is None
    assert images.pixels.shape == (7, 3, 16, 16)
    assert images.pixels.min() >= -1 and images.pixels.max() <= 1
    assert images.captions[1] == "a blue square" and images.captions[0] == "a red circle"
    wide = images.pixels[images.paths.index(folder / "wide.jpg")]
    assert torch.allclose(wide[0], torch.ones(16, 16), atol=0.02)  # red, centre-cropped
    limited, _ = load_training_data(_cfg(folder, limit=2), resolution=16)
    assert [p.name for p in limited.paths] == ["img000.png", "img001.png"]


def _corrupt(folder: Path) -> Path:
    path = folder / "corrupt.png"
    path.write_bytes(b"not an image at all")
    return path


def _truncated(folder: Path) -> Path:
    src = folder / "img000.png"
    path = folder / "truncated.png"
    path.write_bytes(src.read_bytes()[:100])
    return path


def _too_small(folder: Path) -> Path:
    path = folder / "tiny.png"
    Image.new("RGB", (4, 4)).save(path)
    return path


def _unsupported(folder: Path) -> Path:
    path = folder / "anim.gif"
    Image.new("RGB", (24, 24)).save(path)
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_corrupt, "not a readable image"),
        (_truncated, "corrupt or unreadable"),
        (_too_small, "too small"),
        (_unsupported, "unsupported file type"),
    ],
)
def test_bad_image_names_file(
    image_dir: Callable[..., Path], make: Callable[[Path], Path], reason: str
) -> None:
    folder = image_dir(n=3, size=24)
    bad = make(folder)
    with pytest.raises(DataError) as e:
        load_training_data(_cfg(folder), resolution=16)
    assert str(bad) in str(e.value) and reason in str(e.value)
    with pytest.warns(UserWarning, match="skipped 1 bad file"):
        images, _ = load_training_data(_cfg(folder, on_bad_image="skip"), resolution=16)
    assert len(images) == 3 and images.skipped[0][0] == bad


def test_empty_missing_and_all_bad(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.dir: folder .* does not exist"):
        load_training_data(_cfg(tmp_path / "nope"), resolution=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="data.dir: no usable images"):
        load_training_data(_cfg(tmp_path / "empty"), resolution=16)
    (tmp_path / "bad").mkdir()
    _corrupt(tmp_path / "bad")
    with pytest.raises(DataError, match=r"no usable images .*\(1 bad files skipped\)"):
        load_training_data(_cfg(tmp_path / "bad", on_bad_image="skip"), resolution=16)


def test_prompt_required_without_captions(image_dir: Callable[..., Path]) -> None:
    folder = image_dir(n=2)
    with pytest.raises(DataError, match="data.instance_prompt: required"):
        load_training_data(DataConfig(dir=folder), resolution=16)


def test_class_images(image_dir: Callable[..., Path]) -> None:
    folder, classes = image_dir(n=2), image_dir(n=3, name="classes", seed=1)
    cfg = _cfg(folder, class_dir=classes, class_prompt="a circle")
    images, cls = load_training_data(cfg, resolution=16)
    assert cls is not None and len(cls) == 3 and cls.captions == ["a circle"] * 3
    _too_small(classes)
    with pytest.raises(DataError, match="tiny.png"):
        load_images(classes, key="data.class_dir", resolution=16, prompt="x", cfg=cfg)


def test_batch_indices_are_shuffled_epochs() -> None:
    seq = batch_indices(5, seed=0, start=0, count=15)
    for e in range(3):
        assert sorted(seq[5 * e : 5 * e + 5]) == list(range(5))
    assert batch_indices(5, 0, 7, 4) == seq[7:11]  # any position, directly
    assert batch_indices(5, 1, 0, 15) != seq
