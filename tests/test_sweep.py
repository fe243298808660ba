# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""Sweeps: grid validation before anything runs, run names and seeds, a local sweep on the tiny model
and its report, the study's SD 1.5 config validated without weights."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import write_images
from daemon_helpers import daemons, home  # noqa: F401 - fixtures

from dallm.cli import main as dallm_main
from dallm.config import ConfigError, load_config
from dallm.preflight import preflight
from dallm.sweep import parse_grid, plan_sweep, read_manifest

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, model: Path, images: Path, extra: str = "") -> Path:
    path = tmp_path / "job.toml"
    path.write_text(
        f'name = "sw"\nseed = 3\n[model]\nbase = "{model}"\n'
        f'[data]\ndir = "{images}"\ninstance_prompt = "a red circle"\n'
        '[train]\nsteps = 4\ndevice = "cpu"\nlr = 1e-3\n'
        '[monitor]\nwindow = 2\nearly_stop = "off"\n[checkpoint]\nevery = 2\nkeep = 1\n' + extra
    )
    return path


def test_grid_parsing() -> None:
    axes = parse_grid(["lora.rank=1,4,16", "train.lr=1e-4, 3e-4"])
    assert [a.values for a in axes] == [[1, 4, 16], [1e-4, 3e-4]]
    for bad, why in (
        ("lora.rank", "expected KEY=V1,V2"),
        ("lora.rank=", "empty value"),
        ("lora.rank=1,,2", "empty value"),
        ("seed=1,2", "--repeat"),
        ("lora.rank=1,1", "repeated value"),
    ):
        with pytest.raises(ConfigError, match=why):
            parse_grid([bad])
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["lora.rank=1", "lora.rank=2"])


def test_plan_names_seeds_and_errors(tmp_path: Path, tiny_sd: Path, image_dir: Callable[..., Path]) -> None:
    cfg = _config(tmp_path, tiny_sd, image_dir(n=4))
    sweep, configs = plan_sweep(cfg, ["lora.rank=1,4", "data.limit=2,4"], repeat=2, sweep_id="s1")
    names = [r.name for r in sweep.runs]
    assert names[:3] == ["sw-r1-n2-s0", "sw-r1-n2-s1", "sw-r1-n4-s0"] and len(names) == 8
    assert [c.seed for c in configs[:2]] == [3, 4]
    assert configs[-1].lora.rank == 4 and configs[-1].data.limit == 4 and configs[-1].name == "sw-r4-n4-s1"
    # every bad value is named in one line before anything runs
    for grid, needle in (
        (["lora.rnk=1,2"], "--grid lora.rnk=1: lora.rnk: unknown key"),
        (["lora.rank=2,0"], "--grid lora.rank=0: lora.rank:"),
        (["data.limit=2,5"], "--grid data.limit=5: data.dir:"),
        (["train.method=lora,fancy"], "--grid train.method=fancy: train.method:"),
    ):
        with pytest.raises(ConfigError) as e:
            plan_sweep(cfg, grid)
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_grid_runs_nothing(tmp_path: Path, tiny_sd: Path, image_dir: Callable[..., Path], capsys) -> None:
    cfg = _config(tmp_path, tiny_sd, image_dir(n=4))
    out = tmp_path / "sweep"
    argv = ["sweep", str(cfg), "--local", "--out", str(out), "--grid", "lora.rank=1,-1"]
    assert dallm_main(argv) == 1
    assert "lora.rank=-1" in capsys.readouterr().err
    assert not out.exists()


def test_local_sweep_and_report(
    tmp_path: Path, tiny_sd: Path, image_dir: Callable[..., Path], capsys
) -> None:
    images = image_dir(n=4)
    extra = (
        f'[samples]\nevery = 2\nprompts = ["a red circle"]\nseeds = [0]\nsteps = 2\n'
        f'[eval]\nevery = 2\nfeatures = "micro"\nval_dir = "{image_dir(n=4, name="val", seed=1)}"\n'
        "num_images = 4\nsubset_size = 4\nnum_subsets = 5\nsteps = 2\n"
    )
    cfg = _config(tmp_path, tiny_sd, images, extra)
    out = tmp_path / "sweep"
    argv = ["sweep", str(cfg), "--local", "--out", str(out), "--id", "t", "--grid", "train.method=lora,full"]
    assert dallm_main([*argv, "--set", "train.ema_decay=0.5"]) == 1  # EMA is for full only: refused
    assert "train.ema_decay" in capsys.readouterr().err
    assert dallm_main([*argv, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["state"] for r in printed["runs"]] == ["done", "done"]
    sweep = read_manifest(out)
    assert sweep.id == "t" and sweep.grid == [{"key": "train.method", "values": ["lora", "full"]}]
    assert (out / "sw-lora-s0" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "sw-full-s0" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert dallm_main(argv) == 0  # a second call finds every run done
    assert "done already" in capsys.readouterr().out

    assert dallm_main(["report", "--sweep", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    for name in (
        "kid_train_method",
        "final_kid_train_method",
        "samples_train_method",
        "table_md",
        "table_csv",
    ):
        assert Path(rep["written"][name]).is_file(), (name, rep)
    rows = list(csv.DictReader((out / "report" / "table.csv").open()))
    by = {r["train.method"]: r for r in rows}
    assert int(by["full"]["trainable_params"]) > 20 * int(by["lora"]["trainable_params"]) > 0
    assert int(by["full"]["result_bytes"]) > int(by["lora"]["result_bytes"])
    assert float(by["lora"]["train_s_per_step"]) > 0 and float(by["full"]["sample_s_per_image"]) > 0
    assert by["lora"]["kid_val_final"] and by["full"]["kid_base_final"]
    assert "| full | 1 |" in (out / "report" / "table.md").read_text()


def test_full_refuses_auto_early_stop(tmp_path: Path, tiny_sd: Path, image_dir: Callable[..., Path]) -> None:
    cfg = _config(tmp_path, tiny_sd, image_dir(n=4))
    with pytest.raises(ConfigError, match='--set monitor.early_stop=auto: "auto" needs CS-Fluctuation'):
        load_config(cfg, ["train.method=full", "monitor.early_stop=auto"])


def test_sd15_config_validates_without_weights(tmp_path: Path, image_dir: Callable[..., Path]) -> None:
    path = ROOT / "configs" / "sd15-baroque-cat.toml"
    cfg = load_config(path)
    assert cfg.model.base in ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5")
    assert (cfg.lora.rank, cfg.data.limit, cfg.tokens.new) == (4, 20, ["<s1>", "<s2>"])
    assert (cfg.checkpoint.every, cfg.samples.every, cfg.eval.every, cfg.eval.features) == (
        25, 25, 250, "inception"
    )  # fmt: skip
    assert cfg.data.class_dir is not None and cfg.eval.val_dir is not None  # prior preservation, validation
    with pytest.raises(ConfigError) as e:  # the shipped placeholders: a clear error naming the fix
        preflight(cfg)
    assert "data.dir: folder" in str(e.value) and "--set data.dir=FOLDER" in str(e.value)
    train, val, cls = image_dir(n=20, name="train"), image_dir(n=4, name="val"), image_dir(n=4, name="cls")
    sets = [f"data.dir={train}", f"eval.val_dir={val}", f"data.class_dir={cls}", "data.min_size=16"]
    preflight(load_config(path, sets))
    with pytest.raises(ConfigError, match="fewer than data.limit=20"):
        preflight(load_config(path, [f"data.dir={val}", *sets[1:]]))
    sweep, _ = plan_sweep(path, ["lora.rank=1,4,16"], sets=sets)  # the study's rank sweep plans here
    assert [r.name for r in sweep.runs] == [f"sd15-baroque-cat-r{r}-s0" for r in (1, 4, 16)]


def test_daemon_sweep_grouped_in_ls_and_reported(daemons, home: Path, tmp_path: Path, capsys) -> None:
    daemons(step_s=0.002)  # the fake engine
    images = tmp_path / "imgs"
    write_images(images, 3)
    cfg = tmp_path / "job.toml"
    cfg.write_text(
        f'name = "ds"\n[data]\ndir = "{images}"\ninstance_prompt = "a red circle"\n[train]\nsteps = 6\n[monitor]\nwindow = 2\n'
    )
    base = ["--home", str(home)]
    assert dallm_main(["sweep", str(cfg), "--grid", "lora.rank=1,0", *base]) == 1  # nothing queued
    assert "--grid lora.rank=0" in capsys.readouterr().err
    assert dallm_main(["submit", str(cfg), "--set", "name=alone", "--wait", *base]) == 0
    argv = ["sweep", str(cfg), "--grid", "lora.rank=1,2", "--repeat", "2", "--id", "sw1", "--wait", "--json"]
    assert dallm_main([*argv, *base]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert [r["job"] for r in out["runs"]] == [2, 3, 4, 5] and {r["state"] for r in out["runs"]} == {
        "finished"
    }
    folder = Path(out["folder"])
    assert folder == home.resolve() / "jobs" / "sw1" and (folder / "ds-r2-s1" / "metrics.jsonl").is_file()
    assert dallm_main(["ls", *base]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2] == "sweep sw1:" and "alone" in table[1] and "  ds-r1-s0" in table[3]
    assert dallm_main(["ls", "--sweep", "sw1", "--json", *base]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [j["id"] for j in listed] == [2, 3, 4, 5] and listed[0]["sweep"] == "sw1"
    assert dallm_main(["report", "--sweep", "sw1", *base]) == 0  # by id, found under the home
    assert (folder / "report" / "table.csv").is_file()
