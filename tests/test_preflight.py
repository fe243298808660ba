# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""The one preflight: each un-runnable job is refused in one line naming the key or file, by the
library, `dallm train`, `dallm submit`, `dallm sweep` and the daemon's submit handler (a client
that is not our CLI), and nothing is queued."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import write_images
from daemon_helpers import config, daemons, home  # noqa: F401

from dallm.cli import main
from dallm.client.client import DaemonError
from dallm.config import config_from_dict
from dallm.preflight import PreflightError, check_hub, model_shape, preflight, resolve_base


def _cfg(data_dir: Path, **sections: dict[str, Any]) -> Any:
    data: dict[str, Any] = {
        "data": {"dir": str(data_dir), "instance_prompt": "a red circle"},
        "train": {"steps": 20},
        "monitor": {"window": 2},
    }
    for key, values in sections.items():
        data.setdefault(key, {}).update(values)
    return config_from_dict(data)


def _corrupt(folder: Path) -> Path:
    """A PNG cut in half: it opens (the header is fine) but does not decode."""
    write_images(folder, 2)
    bad = folder / "img001.png"
    bad.write_bytes(bad.read_bytes()[:120])
    return bad


# Each case: how to spoil a good folder of 3 images, the sections to change, and what the message says.
BAD: dict[str, tuple[Callable[[Path], Any], dict[str, dict[str, Any]], str]] = {
    "empty folder": (lambda d: [p.unlink() for p in d.iterdir()], {}, "data.dir: no images (.png"),
    "missing folder": (lambda d: d.rename(d.with_name("gone")), {}, "data.dir: folder"),
    "corrupt png": (_corrupt, {}, "data.dir: {d}/img001.png: corrupt or unreadable"),
    "docx": (lambda d: (d / "notes.docx").write_bytes(b"PK"), {}, "data.dir: unsupported file(s) in {d}: notes.docx"),
    "missing caption": (
        lambda d: write_images(d, 3, captions=True) and (d / "img002.txt").unlink(),
        {"data": {"instance_prompt": ""}},
        "data.instance_prompt: empty, and {d}/img002.png has no img002.txt caption",
    ),
    "too small": (lambda d: write_images(d, 3, size=8), {}, "data.dir: {d}/img000.png: too small (8x8)"),
    "limit": (lambda d: None, {"data": {"limit": 5}}, "data.dir: {d} has 3 usable images, fewer than data.limit=5"),
    "nonexistent model": (lambda d: None, {"model": {"base": "/tmp/nonexistent-model"}}, "model.base: folder /tmp/nonexistent-model does not exist"),
    "not a model id": (lambda d: None, {"model": {"base": "what is this?"}}, "model.base: 'what is this?' is neither"),
    "rank": (lambda d: None, {"lora": {"rank": 64}}, "lora.rank: 64 is wider than the model's narrowest attention layers (48)"),
    "text rank": (lambda d: None, {"lora": {"text_encoder": True, "text_encoder_rank": 65}}, "lora.text_encoder_rank: 65 is wider than the text encoder (64)"),
    "resolution": (lambda d: None, {"model": {"resolution": 36}}, "model.resolution: 36 is not a multiple of 8"),
    "val_dir": (lambda d: write_images(d.with_name("val"), 1), {"eval": {"val_dir": "VAL"}}, "eval.val_dir: {v} has 1 usable images, 2 needed"),
}  # fmt: skip


def _spoil(tmp_path: Path, case: str) -> tuple[Path, dict[str, dict[str, Any]], str]:
    spoil, sections, message = BAD[case]
    folder = write_images(tmp_path / "imgs", 3)
    spoil(folder)
    val = tmp_path / "val"
    sections = {
        k: {kk: (str(val) if vv == "VAL" else vv) for kk, vv in v.items()} for k, v in sections.items()
    }
    return folder, sections, message.format(d=folder, v=val)


@pytest.mark.parametrize("case", list(BAD))
def test_preflight_refuses_in_one_line(tmp_path: Path, case: str) -> None:
    folder, sections, message = _spoil(tmp_path, case)
    with pytest.raises(PreflightError) as e:
        preflight(_cfg(folder, **sections))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_preflight_passes_runnable_jobs(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "imgs", 3, captions=True)
    (folder / "notes.md").write_text("side files are fine")
    preflight(_cfg(folder, data={"instance_prompt": ""}))  # every image has its caption
    preflight(_cfg(folder, lora={"rank": 48, "text_encoder": True}, model={"resolution": 48}))
    preflight(_cfg(folder, model={"base": "stable-diffusion-v1-5/stable-diffusion-v1-5"}))  # hub id form
    _corrupt(folder)
    (folder / "notes.docx").write_bytes(b"PK")
    preflight(_cfg(folder, data={"on_bad_image": "skip"}))  # the loader skips them: runnable
    assert model_shape("micro").resolution == 32


def test_dallm_train_refuses_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_images(tmp_path / "imgs", 3)
    (folder / "report.docx").write_bytes(b"PK")
    job = tmp_path / "job.toml"
    job.write_text(f'[data]\ndir = "{folder}"\ninstance_prompt = "a red circle"\n[train]\nsteps = 4\n'
                   '[monitor]\nwindow = 2\n')  # fmt: skip
    assert main(["train", str(job), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err == f"dallm train: {job}: data.dir: unsupported file(s) in {folder}: report.docx; " \
        'use .png, .jpg, .jpeg, .webp, remove them or set data.on_bad_image = "skip"\n'  # fmt: skip
    assert not (tmp_path / "out").exists()
    assert main(["train", str(job), "--set", "model.base=/nonexistent"]) == 1
    assert capsys.readouterr().err == (
        "dallm train: --set model.base=/nonexistent: folder /nonexistent does not exist; "
        "give 'micro', a diffusers folder or a hub id\n"
    )


def test_submit_sweep_and_daemon_refuse_and_queue_nothing(
    daemons, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = daemons()
    base = ["--home", str(home)]
    with d.client() as c:
        c.submit(config("ok", steps=2))  # one job in the queue, to see that the count stays
        for i, case in enumerate(BAD):
            folder, sections, message = _spoil(tmp_path / str(i), case)
            cfg = _cfg(folder, **sections)
            # a client that is not our CLI: the daemon's own preflight, a typed one-line error
            with pytest.raises(DaemonError) as e:
                c.submit(cfg.model_dump(mode="json"), source="api.toml")
            assert e.value.code == "preflight_failed", case
            assert str(e.value).startswith(f"api.toml: {message}") and "\n" not in str(e.value), case
            # our CLI: the same check before it asks the daemon; one line on stderr, exit 1
            job = tmp_path / str(i) / "job.toml"
            job.write_text(f'[data]\ndir = "{folder}"\ninstance_prompt = "a red circle"\n[train]\nsteps = 20\n'
                           '[monitor]\nwindow = 2\n')  # fmt: skip
            argv = [
                x
                for s, kv in sections.items()
                for k, v in kv.items()
                for x in ("--set", f"{s}.{k}={json.dumps(v)}")
            ]
            assert main(["submit", str(job), *argv, *base]) == 1, case
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith("dallm submit: "), (case, err)
            assert message.split(": ", 1)[1][:30] in err, (case, err)
            assert main(["sweep", str(job), "--grid", "train.lr=1e-4,2e-4", "--dry-run", *argv, *base]) == 1
            assert message.split(": ", 1)[1][:30] in capsys.readouterr().err, case
        assert len(c.jobs()) == 1  # nothing was queued


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"train": {"batch_size": 10**9}}, "train.batch_size: 1000000000 is more than 65536"),
        (
            {"train": {"batch_size": 60_000}, "model": {"resolution": 4096}},
            "train.batch_size: 60000 images of 4096 px need about",
        ),
        ({"train": {"steps": 10**12}}, "train.steps: 1000000000000 is more than"),
        ({"model": {"resolution": 2**20}}, "model.resolution: 1048576 is more than 4096"),
    ],
    ids=["batch", "batch-memory", "steps", "resolution"],
)
def test_upper_bounds_are_refused_in_one_line(tmp_path: Path, sections: dict[str, Any], message: str) -> None:
    """Issue 25: a batch of 10**9 was queued and sat at step 0 growing its memory."""
    folder = write_images(tmp_path / "imgs", 2)
    with pytest.raises(PreflightError) as e:
        preflight(_cfg(folder, **sections))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_relative_base_is_a_hub_id_whatever_the_cwd_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 25: `org/model` was a folder or a hub id depending on the process's working directory."""
    from dallm.micro import MODEL_DIR

    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").symlink_to(MODEL_DIR)
    monkeypatch.chdir(tmp_path)
    assert resolve_base("org/model") == "org/model"
    assert model_shape("org/model").resolution is None  # nothing read from the cwd's folder
    assert resolve_base("./org/model") == str(MODEL_DIR.resolve())  # an explicit path is one


def test_an_unfetchable_hub_id_is_refused_with_its_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        PreflightError,
        match=r"model.base: hub id 'nosuch/model' is not in the local .* HF_HUB_OFFLINE is set",
    ):
        check_hub("nosuch/model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "ENDPOINT", "https://no-such-host.invalid")
    with pytest.raises(PreflightError, match=r"no-such-host.invalid cannot be reached \(.+\)"):
        check_hub("nosuch/model")
    check_hub("micro")
    check_hub("micro-llm")


def test_the_daemon_refuses_an_offline_hub_id_and_a_huge_batch_at_submit(daemons, home: Path) -> None:
    d = daemons(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(home.parent / "empty-cache"))
    with d.client() as c:
        for sections, message in [
            ({"model": {"base": "nosuch/model"}}, "HF_HUB_OFFLINE is set"),
            ({"train": {"batch_size": 10**9}}, "train.batch_size: 1000000000 is more than"),
        ]:
            with pytest.raises(DaemonError) as err:
                c.submit(config("x", steps=3, **sections))
            assert err.value.code == "preflight_failed" and message in str(err.value)
        assert c.jobs() == []
