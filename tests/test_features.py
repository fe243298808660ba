"""Feature extractors (micro, inception, clip:FOLDER), image handling, and `dallm kid`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dallm.cli import main
from dallm.eval.features import FeatureError, features_of_folder, list_images, load_extractor, to_rgb
from dallm.eval.inception import INCEPTION_WEIGHTS_NAME, InceptionV3, resize_bilinear_tf1

# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=30,
        patch_size=6,
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPVisionModelWithProjection(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights in torch-fidelity's format: a torch.save'd state dict with its key names."""
    torch.manual_seed(0)
    net = InceptionV3()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")  # keep activations alive
    path = tmp_path_factory.mktemp("hub") / INCEPTION_WEIGHTS_NAME
    torch.save(net.state_dict(), path)
    return path


def mixed_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    return [
        rgb,
        rgb.convert("RGBA"),
        rgb.convert("L"),
        rgb.convert("P"),
        rgb.convert("CMYK"),
        Image.fromarray(rng.integers(0, 256, (17, 17), dtype=np.uint8)).convert("1"),
        Image.fromarray(rng.integers(0, 65535, (33, 21), dtype=np.uint16)),  # 16-bit grayscale
        Image.fromarray(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8), "RGBA"),
    ]


# ----------------------------------------------------------------------------------------------
# images


def test_to_rgb_handles_every_mode():
    for img in mixed_images():
        out = to_rgb(img)
        assert out.mode == "RGB" and out.size == img.size
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red: composited over white
    assert to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([10, 20, 30] + [0] * 765)
    pal.info["transparency"] = 0
    assert to_rgb(pal).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert to_rgb(deep).getpixel((0, 0)) == (255, 255, 255)


def test_tf1_bilinear_resize_matches_the_formula():
    rng = np.random.default_rng(1)
    x = rng.random((1, 2, 5, 7))
    out = resize_bilinear_tf1(torch.from_numpy(x), 9).numpy()
    ref = np.zeros((1, 2, 9, 9))
    for oy in range(9):
        for ox in range(9):
            sy, sx = oy * 5 / 9, ox * 7 / 9  # TF1: no half-pixel offset
            y0, x0 = int(np.floor(sy)), int(np.floor(sx))
            y1, x1 = min(y0 + 1, 4), min(x0 + 1, 6)
            fy, fx = sy - y0, sx - x0
            top = x[..., y0, x0] * (1 - fx) + x[..., y0, x1] * fx
            bottom = x[..., y1, x0] * (1 - fx) + x[..., y1, x1] * fx
            ref[..., oy, ox] = top * (1 - fy) + bottom * fy
    assert np.allclose(out, ref, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# extractors


def test_clip_extractor_on_images_of_any_size_and_mode(tiny_clip):
    ex = load_extractor(f"clip:{tiny_clip}")
    assert ex.dim == 16
    images = mixed_images()
    feats = ex(images)
    assert feats.shape == (len(images), 16) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    alone = ex([images[2]])  # an image's features do not depend on its batch
    assert torch.allclose(alone[0], feats[2], atol=1e-5)
    tensor_feats = ex(torch.rand(3, 3, 30, 30))
    assert tensor_feats.shape == (3, 16)
    ex.batch_size = 2
    assert torch.allclose(ex(images), feats, atol=1e-5)


def test_clip_extractor_errors(tmp_path):
    with pytest.raises(FeatureError, match="no such folder"):
        load_extractor(f"clip:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatureError, match="cannot load a CLIP vision model"):
        load_extractor(f"clip:{tmp_path / 'empty'}")
    with pytest.raises(FeatureError, match="unknown feature extractor"):
        load_extractor("vgg")


def test_inception_without_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FeatureError) as err:
        load_extractor("inception")
    msg = str(err.value)
    assert INCEPTION_WEIGHTS_NAME in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert "\n" not in msg
    with pytest.raises(FeatureError, match="not found"):
        load_extractor("inception", inception_weights=tmp_path / "missing.pth")


def test_inception_weights_in_torch_fidelity_format(inception_weights, tmp_path, monkeypatch):
    state = torch.load(inception_weights, weights_only=True)
    # torch-fidelity's FeatureExtractorInceptionV3 key names and shapes
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert state["Mixed_7c.branch3x3dbl_3b.bn.running_var"].shape == (384,)
    assert state["fc.weight"].shape == (1008, 2048)
    # found in the torch hub cache, as torch-fidelity leaves it
    hub = inception_weights.parent
    (hub / "checkpoints").mkdir(exist_ok=True)
    (hub / "checkpoints" / INCEPTION_WEIGHTS_NAME).write_bytes(inception_weights.read_bytes())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    ex = load_extractor("inception")
    images = [mixed_images()[0], Image.new("RGB", (20, 20), (200, 30, 30))]
    feats = ex(images)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert not torch.allclose(feats[0], feats[1])
    # a file of another network is refused with the reason
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(FeatureError, match="not torch-fidelity's Inception-v3"):
        load_extractor("inception", inception_weights=bad)


def test_micro_extractor():
    import dallm.micro as micro

    assert Path(micro.FEATNET_PATH).is_file()  # shipped in the repository
    ex = load_extractor("micro")
    feats = ex(mixed_images())
    assert feats.shape == (8, ex.dim) and torch.isfinite(feats).all()
    assert ex(torch.rand(2, 3, 32, 32)).shape == (2, ex.dim)


# ----------------------------------------------------------------------------------------------
# folders and `dallm kid`


def write(folder: Path, n: int, colour: tuple[int, int, int], seed: int, exts=(".png",)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        noise = rng.integers(-20, 21, (24, 24, 3))
        pixels = np.clip(np.array(colour)[None, None] + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}{exts[i % len(exts)]}")
    return folder


def test_features_of_folder_reads_png_jpg_webp(tiny_clip, tmp_path):
    folder = write(tmp_path / "a", 6, (200, 50, 50), 0, exts=(".png", ".jpg", ".webp"))
    (folder / "notes.txt").write_text("not an image")
    assert [p.suffix for p in list_images(folder)] == [".png", ".jpg", ".webp"] * 2
    ex = load_extractor(f"clip:{tiny_clip}", batch_size=4)
    feats = features_of_folder(ex, folder, batch_size=4)
    assert feats.shape == (6, 16)


def test_folder_errors(tiny_clip, tmp_path):
    with pytest.raises(FeatureError, match="no such folder"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatureError, match="no images"):
        list_images(tmp_path / "empty")
    folder = write(tmp_path / "bad", 2, (0, 0, 0), 0)
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(FeatureError, match="broken.png: cannot read image"):
        features_of_folder(load_extractor(f"clip:{tiny_clip}"), folder)


def test_kid_command(tiny_clip, tmp_path, capsys):
    a = write(tmp_path / "a", 12, (200, 40, 40), 0)
    a2 = write(tmp_path / "a2", 12, (200, 40, 40), 1)
    b = write(tmp_path / "b", 20, (40, 40, 200), 2)
    args = ["--features", f"clip:{tiny_clip}", "--num-subsets", "20", "--json"]
    assert main(["kid", str(a), str(b), *args]) == 0
    far = json.loads(capsys.readouterr().out)
    assert far["subset_size"] == 6 and far["n_a"] == 12 and far["n_b"] == 20  # half the smaller folder
    assert far["kid_std"] > 1e-6  # subsets smaller than the sets: a spread that means something
    assert main(["kid", str(a), str(a2), *args]) == 0
    near = json.loads(capsys.readouterr().out)
    assert far["kid"] > near["kid"] and far["kid"] > 0
    assert main(["kid", str(a), str(b), "--features", f"clip:{tiny_clip}", "--subset-size", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("KID ") and "±" in out and "subsets of 5" in out
    assert main(["kid", str(a), str(b), "--features", f"clip:{tiny_clip}", "--subset-size", "12"]) == 0
    got = capsys.readouterr()
    assert "subsets of 6" in got.out and "--subset-size: KID subset size 12 >= the smaller set" in got.err


def test_kid_command_errors(tiny_clip, tmp_path, capsys):
    a = write(tmp_path / "a", 3, (1, 2, 3), 0)
    empty = tmp_path / "empty"
    empty.mkdir()
    clip = ["--features", f"clip:{tiny_clip}"]
    cases = [
        ([str(a), str(tmp_path / "missing")], "missing: no such folder"),
        ([str(empty), str(a)], "empty: no images"),
        (
            [str(a), str(a), "--features", "inception", "--inception-weights", str(tmp_path / "w.pth")],
            "w.pth not found",
        ),
        ([str(a), str(a), "--subset-size", "1"], "--subset-size"),
    ]
    (write(tmp_path / "bad", 2, (0, 0, 0), 0) / "zz.jpg").write_bytes(b"\x00" * 10)
    cases.append(([str(tmp_path / "bad"), str(a), *clip], "zz.jpg: cannot read image"))
    single = write(tmp_path / "single", 1, (0, 0, 0), 0)
    cases.append(([str(single), str(a), *clip], "KID needs at least 2"))
    for argv, expected in cases:
        assert main(["kid", *argv]) != 0, argv
        err = capsys.readouterr().err
        assert expected in err and err.startswith("dallm kid: ") and err.count("\n") == 1, err


def test_micro_extractor_with_a_random_feature_net(tmp_path, monkeypatch):
    import dallm.micro as micro
    from dallm.micro import featnet

    torch.manual_seed(0)
    path = tmp_path / "featnet.safetensors"
    featnet.save(featnet.FeatureNet(), path)
    monkeypatch.setattr(micro, "FEATNET_PATH", path)
    ex = load_extractor("micro")
    assert ex.dim == micro.feature_dim
    feats = ex(mixed_images())
    assert feats.shape == (8, ex.dim) and torch.isfinite(feats).all()
