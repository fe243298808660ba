"""Checkpoint files never run code: state.pt is read with weights_only unpickling."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dallm.engine.checkpoint import STATE_FILE, TrainState, capture_rng, load_checkpoint, save_checkpoint


class _Payload:
    """Unpickling this with a full unpickler touches a file: what an attacker's state.pt would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickle_does_not_run(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints" / "step-000003"
    folder.mkdir(parents=True)
    marker = tmp_path / "pwned"
    with open(folder / STATE_FILE, "wb") as f:
        pickle.dump({"step": 3, "unet_lora": {}, "extra": _Payload(marker)}, f)
    with pytest.raises(ValueError, match="state.pt: not a dallm checkpoint state") as e:
        load_checkpoint(folder)
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    torch.save([1, 2, 3], tmp_path / STATE_FILE)
    with pytest.raises(ValueError, match="not a dallm checkpoint state"):
        load_checkpoint(tmp_path)


def test_round_trip_keeps_rng_and_snapshots(tmp_path: Path) -> None:
    random.seed(5)
    np.random.seed(5)
    gen = torch.Generator().manual_seed(5)
    snap = TrainState(2, {"a": torch.ones(2)}, None, torch.zeros(1, 3))
    state = TrainState(
        4,
        {"a": torch.arange(3.0)},
        optimizer={"state": {0: {"step": torch.tensor(4.0)}}, "param_groups": [{"betas": (0.9, 0.99)}]},
        rng=capture_rng(gen),
        extra={"history": [0.1, 0.2], "snapshots": [snap]},
    )
    back = load_checkpoint(save_checkpoint(tmp_path, state))
    assert back.step == 4 and torch.equal(back.lora["a"], state.lora["a"])
    assert back.optimizer["param_groups"] == [{"betas": (0.9, 0.99)}]
    assert torch.equal(back.optimizer["state"][0]["step"], torch.tensor(4.0))
    (kind, keys, pos, has_gauss, cached), want = back.rng["numpy"], np.random.get_state()
    assert kind == want[0] and keys.dtype == want[1].dtype and np.array_equal(keys, want[1])
    assert (pos, has_gauss, cached) == want[2:]
    assert back.rng["python"] == random.getstate()
    got = back.extra["snapshots"][0]
    assert isinstance(got, TrainState) and got.step == 2 and torch.equal(got.token_rows, snap.token_rows)


def test_unsupported_object_named_on_save(tmp_path: Path) -> None:
    state = TrainState(1, {}, extra={"history": [object()]})
    with pytest.raises(TypeError, match=r"state\.extra\.history\[0\] is a object"):
        save_checkpoint(tmp_path, state)


def test_a_checkpoint_written_with_unet_lora_still_loads(tmp_path: Path) -> None:
    """TrainState's model LoRA was `unet_lora` (also for LLM jobs) before it became `lora`."""
    from dallm.engine.checkpoint import _to_plain

    snap = TrainState(2, {"w": torch.ones(1)})
    old = _to_plain({"step": 4, "lora": {"w": torch.zeros(1)}, "extra": {"snapshots": [snap]}})
    old["unet_lora"] = old.pop("lora")
    old["extra"]["snapshots"][0]["__dallm_train_state__"]["unet_lora"] = old["extra"]["snapshots"][0][
        "__dallm_train_state__"
    ].pop("lora")
    torch.save(old, tmp_path / STATE_FILE)
    back = load_checkpoint(tmp_path)
    assert back.step == 4 and torch.equal(back.lora["w"], torch.zeros(1))
    assert torch.equal(back.extra["snapshots"][0].lora["w"], torch.ones(1))
