"""Each bad config gives one line naming the key path and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from dallm.config import (
    ConfigError,
    config_from_dict,
    fidelity_judge,
    load_config,
    parse_override,
    save_config,
)


def _base(**over: dict) -> dict:
    data = {"data": {"dir": "/tmp/images"}, "train": {"steps": 100}}
    for k, v in over.items():
        data.setdefault(k, {}).update(v)
    return data


@pytest.mark.parametrize(
    ("override", "key", "reason"),
    [
        ({"train": {"stepz": 5}}, "train.stepz", "unknown key"),
        ({"bogus": {"x": 1}}, "bogus", "unknown key"),
        ({"train": {"steps": "many"}}, "train.steps", "integer"),
        ({"lora": {"rank": 0}}, "lora.rank", "greater than or equal to 1"),
        ({"train": {"lr": -1e-4}}, "train.lr", "greater than 0"),
        ({"monitor": {"window": 200}}, "monitor.window", "larger than train.steps"),
        ({"train": {"warmup_steps": 500}}, "train.warmup_steps", "exceeds"),
        ({"train": {"device": "tpu"}}, "train.device", "unknown device"),
        ({"monitor": {"early_stop": "maybe"}}, "monitor.early_stop", "auto"),
        ({"data": {"on_bad_image": "ignore"}}, "data.on_bad_image", "error"),
        ({"tokens": {"ti_steps": 10}}, "tokens.ti_steps", "no tokens"),
        ({"monitor": {"start_step": 90}}, "monitor.start_step", "fewer than 3 windows"),
        ({"monitor": {"window": "two epochs"}}, "monitor.window", "epochs"),
        ({"monitor": {"margin": {"epochs": 0}}}, "monitor.margin", "more than 0"),
        ({"monitor": {"fidelity_margin": -1}}, "monitor.fidelity_margin", "greater than or equal to 0"),
        ({"eval": {"val_loss_timesteps": [10, 1000]}}, "eval.val_loss_timesteps", "0-999"),
        ({"eval": {"val_loss_timesteps": [10, 10]}}, "eval.val_loss_timesteps", "distinct"),
        ({"eval": {"fidelity": "vibes"}}, "eval.fidelity", "micro or clip:FOLDER"),
        ({"eval": {"fidelity_prompts": -1}}, "eval.fidelity_prompts", "greater than or equal to 0"),
        ({"eval": {"kid_bootstrap": 1}}, "eval.kid_bootstrap", "greater than or equal to 2"),
    ],
)
def test_bad_config_names_key(override: dict, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(_base(**override))
    msg = str(e.value)
    assert "\n" not in msg
    assert f": {key}: " in msg and reason in msg


def test_missing_data_dir() -> None:
    with pytest.raises(ConfigError, match="data.dir: required"):
        config_from_dict({})


def test_who_judges_prompt_fidelity() -> None:
    assert fidelity_judge(config_from_dict(_base())) == "micro"  # the micro model: its feature net
    real = {"model": {"base": "/models/sd15"}}
    assert fidelity_judge(config_from_dict(_base(**real))) is None  # inception features: no CLIP to ask
    clip = _base(**real, eval={"features": "clip:/models/clip"})
    assert fidelity_judge(config_from_dict(clip)) == "clip:/models/clip"
    chosen = _base(**real, eval={"fidelity": "clip:/m/c"})
    assert fidelity_judge(config_from_dict(chosen)) == "clip:/m/c"
    assert fidelity_judge(config_from_dict(_base(eval={"fidelity_prompts": 0}))) is None
    assert config_from_dict(_base()).eval.val_loss_timesteps == [10, 350, 500, 650, 990]


def test_bad_set(tmp_path: Path) -> None:
    cfg = tmp_path / "job.toml"
    cfg.write_text('[data]\ndir = "images"\n[train]\nsteps = 10\n')
    with pytest.raises(ConfigError, match="--set 'train.lr': expected KEY=VALUE"):
        load_config(cfg, ["train.lr"])
    with pytest.raises(ConfigError, match="bad key"):
        load_config(cfg, ["train..lr=1"])
    with pytest.raises(ConfigError, match=r"^--set train\.lr=fast: .*valid number"):
        load_config(cfg, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="^--set lora.rank=0: "):
        load_config(cfg, ["lora.rank=0"])
    assert load_config(cfg, ["train.lr=3e-4", "lora.rank=8"]).train.lr == 3e-4
    assert parse_override("data.instance_prompt=a photo") == (["data", "instance_prompt"], "a photo")


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


def test_relative_paths_and_round_trip(tmp_path: Path) -> None:
    cfg_file = tmp_path / "job.toml"
    cfg_file.write_text('name = "j1"\n[data]\ndir = "images"\n[train]\nsteps = 10\n[monitor]\nwindow = 5\n')
    cfg = load_config(cfg_file)
    assert cfg.data.dir == tmp_path / "images"
    save_config(cfg, tmp_path / "out" / "config.toml")
    again = load_config(tmp_path / "out" / "config.toml")
    assert again == cfg


def test_monitor_start_is_the_lora_warm_up() -> None:
    from dallm.config import monitor_start

    cfg = config_from_dict(
        _base(tokens={"new": ["<s1>"], "ti_steps": 30}, train={"steps": 100, "warmup_steps": 20})
    )
    assert monitor_start(cfg) == 30
    assert monitor_start(config_from_dict(_base(monitor={"start_step": 5}))) == 5
    assert monitor_start(config_from_dict(_base())) == 0
