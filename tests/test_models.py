"""Loading a model: local folders through from_pretrained, "micro", and an unreachable hub id."""

from __future__ import annotations

from pathlib import Path

import pytest

from dallm.config import ConfigError, ModelConfig
from dallm.image.models import load_parts, read_resolution, resolve_base


def test_load_tiny(tiny_sd: Path, tiny_sd_vpred: Path) -> None:
    parts = load_parts(ModelConfig(base=str(tiny_sd)))
    assert parts.source == str(tiny_sd.resolve())
    assert parts.resolution == read_resolution(parts.source) == 16
    assert parts.prediction_type == "epsilon"
    assert not any(p.requires_grad for p in parts.unet.parameters())
    assert type(next(iter(parts.unet.attn_processors.values()))).__name__ == "AttnProcessor2_0"
    assert load_parts(ModelConfig(base=str(tiny_sd_vpred))).prediction_type == "v_prediction"
    forced = load_parts(ModelConfig(base=str(tiny_sd), prediction_type="v_prediction"))
    assert forced.prediction_type == "v_prediction"


def test_unreachable_hub_id_says_give_a_local_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as e:
        load_parts(ModelConfig(base="no-such-org/no-such-model-xyz"))
    msg = str(e.value)
    assert msg.startswith("model.base: cannot load 'no-such-org/no-such-model-xyz'") and "local" in msg
    assert "\n" not in msg


def test_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_base(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="not a diffusers model folder"):
        resolve_base(str(tmp_path))


def test_micro_resolves_to_shipped_folder() -> None:
    from dallm import micro

    assert resolve_base("micro") == str(micro.MODEL_DIR)
