"""A window that does not follow the budget (dallm.monitor.window): steps, epochs, an explicit fraction;
and CS-Fluctuation's 1/lr over the window's schedule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dallm.config import (
    ConfigError,
    JobConfig,
    config_from_dict,
    config_to_toml,
    epoch_steps,
    load_config,
    margin_steps,
    window_steps,
)
from dallm.monitor.csf import TurningPointDetector, _csf_core, cs_fluctuation, csf_lag
from dallm.monitor.early_stop import EarlyStop
from dallm.monitor.window import parse_span, span_steps, steps_per_epoch


@pytest.mark.parametrize(
    ("value", "want"),
    [
        (30, 30),
        ("30", 30),
        ({"steps": 30}, 30),
        ("2 epochs", "2 epochs"),
        ("1 epoch", "1 epochs"),
        (" 0.5  Epochs ", "0.5 epochs"),
        ({"epochs": 2}, "2 epochs"),
        ({"epochs": 1.5}, "1.5 epochs"),
        ("5%", 0.05),
        (0.05, 0.05),
        ({"fraction": 0.05}, 0.05),
    ],
)
def test_spans_in_steps_epochs_or_a_fraction(value, want):
    assert parse_span(value, "monitor.window", 2) == want


def test_an_epoch_is_the_steps_that_show_every_item_once():
    assert steps_per_epoch(20, 8) == 3  # 8 + 8 + 4
    assert steps_per_epoch(20, 8, grad_accum=2) == 2
    assert steps_per_epoch(20, 1, repeats=5) == 100
    assert steps_per_epoch(3, 16) == 1
    assert span_steps("2 epochs", 600, 2, epoch_steps=3) == 6
    assert span_steps("0.5 epochs", 600, 2, epoch_steps=3) == 2  # at least the minimum
    assert span_steps(30, 100_000, 2) == 30 and span_steps(0.05, 1200, 2) == 60
    with pytest.raises(ValueError, match="training set's size"):
        span_steps("2 epochs", 600, 2)


def images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{i:03d}.png").write_bytes(b"")  # only counted, never opened
    (folder / "000.txt").write_text("a caption")
    return folder


def cfg(steps: int, data: Path | str = ".", batch: int = 1, limit: int | None = None, **monitor) -> JobConfig:
    d: dict = {"dir": str(data)} | ({"limit": limit} if limit else {})
    return config_from_dict({"data": d, "train": {"steps": steps, "batch_size": batch}, "monitor": monitor})


def test_window_in_epochs_counts_the_training_images(tmp_path):
    folder = images(tmp_path / "train", 20)
    assert window_steps(cfg(600, folder, batch=8, window="2 epochs")) == 6
    assert window_steps(cfg(600, folder, batch=8, window="2 epochs", limit=10)) == 4  # data.limit caps
    assert window_steps(cfg(600, folder, batch=8, window="2 epochs"), train_size=40) == 10  # the job's count
    assert margin_steps(cfg(600, folder, batch=8, margin={"epochs": 1})) == 3
    assert epoch_steps(cfg(600, folder, batch=1)) == 20
    # the same window whatever the budget
    assert {window_steps(cfg(s, folder, window={"epochs": 1})) for s in (600, 1200, 2400)} == {20}
    llm = config_from_dict(
        {"model": {"kind": "llm"}, "data": {"train": "t.jsonl"}, "monitor": {"window": "1 epoch"}}
    )
    with pytest.raises(ConfigError, match="monitor.window: in epochs"):
        window_steps(llm)
    assert window_steps(llm, train_size=4) == 4


def test_the_default_window_and_margin_are_steps_not_a_fraction():
    c = JobConfig.model_validate({"data": {"dir": "."}})
    assert isinstance(c.monitor.window, int) and isinstance(c.monitor.margin, int)
    assert {window_steps(cfg(s)) for s in (600, 1200, 2400)} == {c.monitor.window}
    assert window_steps(cfg(10)) == c.monitor.window  # a short run: no error, CS-Fluctuation just never comes
    with pytest.raises(ConfigError, match="monitor.window: 50 is larger than train.steps"):
        cfg(10, window=50)  # an explicit window is checked
    assert c.monitor.fidelity_margin == 0.4
    with pytest.raises(ConfigError, match="monitor.fidelity_margin"):
        cfg(10, fidelity_margin=-0.1)


def test_a_window_in_epochs_survives_toml(tmp_path):
    c = cfg(600, tmp_path, window={"epochs": 2}, margin="1 epoch")
    path = tmp_path / "c.toml"
    path.write_text(config_to_toml(c))
    again = load_config(path)
    assert again.monitor.window == "2 epochs" and again.monitor.margin == "1 epochs"


def cs_series(n: int = 600, period: int = 240) -> np.ndarray:
    """CS whose curvature is a damped cosine: CS-Fluctuation has valleys every period / 2."""
    t = np.arange(n)
    curvature = 1e-6 * np.exp(-t / (2 * period)) * np.cos(2 * np.pi * t / period)
    return np.cumsum(np.cumsum(curvature))


def turning_point(c: JobConfig, cs: np.ndarray, train_size: int | None = None) -> int | None:
    value = {"cs": 0.0}
    es = EarlyStop(None, c, has_validation=False, cs_fn=lambda: value["cs"], train_size=train_size)
    for i, v in enumerate(cs):
        value["cs"] = float(v)
        es.observe(i + 1, 1e-3)
    return es.turning_point


def test_the_turning_point_does_not_follow_the_planned_steps():
    cs = cs_series()  # the first 600 steps of runs planned at 600, 1,200 and 2,400
    for window in (30, {"epochs": 3}):
        found = {
            turning_point(cfg(s, window=window, start_step=0), cs, train_size=10) for s in (600, 1200, 2400)
        }
        assert len(found) == 1 and None not in found, (window, found)
    # a fraction of the planned steps does follow them (why it is no longer the default)
    by_fraction = [turning_point(cfg(s, window="5%", start_step=0), cs) for s in (600, 1200)]
    assert by_fraction[0] != by_fraction[1]


def test_the_lr_scaling_uses_the_mean_lr_of_the_window():
    m, n = 5, 300
    steps = np.arange(n)
    warm = 30  # linear warm-up from 0, then cosine decay: diffusers' "cosine" schedule
    lr = np.where(
        steps < warm, 1e-3 * steps / warm, 1e-3 * 0.5 * (1 + np.cos(np.pi * (steps - warm) / (n - warm)))
    )
    cs = np.cumsum(np.cumsum(np.random.default_rng(0).normal(0, 1e-6, n)))
    got = cs_fluctuation(list(cs), m, list(lr))
    var = _csf_core(cs, m)
    span = csf_lag(m) + 1  # the updates j .. j+3M-3 behind the CS differences the variance spans
    for j in range(1, n - csf_lag(m)):
        assert got[j] == pytest.approx(var[j - 1] / lr[j : j + span].mean(), rel=1e-9)
    # at the very first step the lr is 0: the index step's lr had no CSF there, the window's has
    assert lr[1] > 0 and got[1] is not None
    lr0 = lr.copy()
    lr0[: 2 * span] = 0.0
    assert cs_fluctuation(list(cs), m, list(lr0))[1] is None  # a window with no update at all
    # the online detector computes the same values
    det = TurningPointDetector(window=m)
    for i in range(n):
        det.update(i, float(cs[i]), float(lr[i]))
    for j, value in det.series:
        assert value == pytest.approx(got[j], rel=1e-9)
    # a constant lr is the paper's Eq. 4 unchanged
    assert cs_fluctuation(list(cs), m, 1e-3)[1] == pytest.approx(var[0] / 1e-3)


def test_a_short_job_with_the_default_window_survives_a_round_trip_through_its_saved_config() -> None:
    """The daemon saves the whole config (job-config.json) and the worker reads it again: the default
    window, now written out, must not turn into "larger than train.steps" (every short daemon job failed)."""
    from dallm.config import config_from_dict, config_to_dict

    cfg = config_from_dict({"data": {"dir": "x"}, "train": {"steps": 5}})
    again = config_from_dict(config_to_dict(cfg))
    assert again.monitor.window == cfg.monitor.window and again.train.steps == 5
