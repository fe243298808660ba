"""CS-Fluctuation (Eqs. 3-4), the turning point (Algorithm 1: the paper's rule and our guard), and
EarlyStop: snapshots, the choice of the returned weights, when to stop, rewinding."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
import torch
from torch import nn

from dallm.config import ConfigError, JobConfig, config_from_dict, load_config, margin_steps, window_steps
from dallm.engine.checkpoint import TrainState
from dallm.monitor.csf import TurningPointDetector, cs_fluctuation, csf_lag
from dallm.monitor.early_stop import Choice, EarlyStop

# ----------------------------------------------------------------------------------------------
# CS-Fluctuation


def csf_transcription(cs: list[float], m: int, lr: list[float]) -> list[float | None]:
    """Eqs. 3-4 written out literally, one index at a time (forward windows of m values)."""
    n = len(cs)

    def ma(j: int) -> float:  # Eq. 3
        return sum(cs[i] for i in range(j, j + m)) / m

    def slope(j: int) -> float:  # nabla MA, first difference
        return ma(j) - ma(j - 1)

    def x(j: int) -> float:  # X_j = MA(nabla(MA(CS)))
        return sum(slope(i) for i in range(j, j + m)) / m

    out: list[float | None] = []
    for j in range(n):
        if j < 1 or j + 3 * m - 3 > n - 1:
            out.append(None)
            continue
        xs = [x(i) for i in range(j, j + m)]
        mean = sum(xs) / m
        lr_j = sum(lr[j : j + 3 * m - 2]) / (3 * m - 2)  # the steps the variance spans
        out.append(sum((v - mean) ** 2 for v in xs) / m / lr_j)  # Eq. 4
    return out


@pytest.mark.parametrize("m", [2, 3, 7])
def test_cs_fluctuation_equals_the_equations(m):
    rng = np.random.default_rng(m)
    n = 80
    cs = list(np.cumsum(rng.normal(0, 1e-3, n)) + 0.01 * np.sin(np.arange(n) / 5))
    lr = list(1e-4 * (1 + np.arange(n) / n))
    got = cs_fluctuation(cs, m, lr)
    want = csf_transcription(cs, m, lr)
    assert len(got) == n
    assert [g is None for g in got] == [w is None for w in want]
    for g, w in zip(got, want, strict=True):
        if w is not None:
            assert g == pytest.approx(w, rel=1e-6, abs=1e-15)
    # the alignment: index 0 and the last 3(m-1) steps are not defined
    defined = [j for j, v in enumerate(got) if v is not None]
    assert defined[0] == 1 and defined[-1] == n - 1 - csf_lag(m)


def test_cs_fluctuation_scalar_lr_and_errors():
    cs = list(np.linspace(0, 1, 30) ** 2)
    assert cs_fluctuation(cs, 3, 1e-3) == cs_fluctuation(cs, 3, [1e-3] * 30)
    assert all(v is None for v in cs_fluctuation(cs[:6], 3, 1e-3))
    with pytest.raises(ValueError):
        cs_fluctuation(cs, 3, [1e-3] * 29)
    with pytest.raises(ValueError):
        cs_fluctuation(cs, 1, 1e-3)


def test_detector_series_equals_the_batch_function():
    rng = np.random.default_rng(0)
    cs = np.cumsum(rng.normal(0, 1e-3, 200))
    lr = 1e-4 * (1 + 0.5 * np.cos(np.arange(200) / 30))
    det = TurningPointDetector(window=5)
    for i in range(200):
        det.update(i + 1, cs[i], lr[i])  # steps start at 1
    batch = cs_fluctuation(list(cs), 5, list(lr))
    series = det.series
    assert len(series) == 200 - csf_lag(5) - 1  # j = 1 .. n - 3M + 2
    for step, value in series:
        assert value == pytest.approx(batch[step - 1], rel=1e-9)


# ----------------------------------------------------------------------------------------------
# turning point on synthetic curves


def oscillating_cs(m: int, n: int, period: int, noise: float, seed: int) -> np.ndarray:
    """CS whose curvature is a damped cosine: CS-Fluctuation ~ curvature^2 has valleys every period/2."""
    t = np.arange(n)
    curvature = 1e-6 * np.exp(-t / (2 * period)) * np.cos(2 * np.pi * t / period)
    cs = np.cumsum(np.cumsum(curvature))
    return cs + np.random.default_rng(seed).normal(0, noise, n)


def local_minima(values: list[float | None]) -> list[int]:
    return [
        j
        for j in range(1, len(values) - 1)
        if None not in (values[j - 1], values[j], values[j + 1])
        and values[j] < values[j - 1]
        and values[j] <= values[j + 1]
    ]


def cfg_for(steps: int, **monitor) -> JobConfig:
    data = {"data": {"dir": "."}, "train": {"steps": steps}, "monitor": {"early_stop": "auto", **monitor}}
    return config_from_dict(data)


def run_like_a_trainer(m: int, cs: np.ndarray, lr: float, first_step: int = 1, **monitor):
    """Feed an EarlyStop as dallm.engine.job.Job does, the "weights after step" naming their step."""
    value = {"cs": 0.0}
    es = EarlyStop(
        None,
        cfg_for(first_step + len(cs), window=m, start_step=0, select="turning", rule="guarded", **monitor),
        has_val_kid=False,
        cs_fn=lambda: value["cs"],
    )
    found = None
    for i, c in enumerate(cs):
        step = first_step + i
        value["cs"] = float(c)
        reading = es.observe(step, lr)
        if es.wants_snapshot(step):
            es.keep(TrainState(step, {"w": torch.full((3,), float(step))}))
        if reading.turning_point is not None:
            found = (reading.turning_point, step)
        assert len(es._snaps) <= es.detector.max_lag // m + 2
    return found, es


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("m", [5, 10])
def test_detector_finds_the_second_valley(m, seed):
    period = 12 * m
    n = 5 * period
    clean = oscillating_cs(m, n, period, 0.0, 0)
    minima = local_minima(cs_fluctuation(list(clean), m, 1e-4))
    assert len(minima) >= 3  # the curve has the valleys we think it has
    expected = minima[1] + 1  # the step of the second valley (steps start at 1)
    cs = oscillating_cs(m, n, period, 1e-6 * (m / 10) ** 2, seed)  # a few % of the per-step change
    (tp, at), es = run_like_a_trainer(m, cs, 1e-4)  # the defaults: guarded, min_rise 0.1 decade
    det = es.detector
    assert tp % m == 0  # a window boundary ...
    assert abs(tp - expected) <= m // 2 + 2  # ... next to the known second valley
    assert abs(det.turning_valley - expected) <= 2
    assert 0 < at - tp <= det.max_lag
    assert det.confirmed_at == at and es.seen_at == at
    snap = es.snapshot(tp)
    assert snap is not None and float(snap.unet_lora["w"][0]) == tp  # the exact weights of that step
    assert es.choose(at) == Choice(tp, "turning")


def feed(det: TurningPointDetector, values) -> int | None:
    found = None
    for j, v in enumerate(values):
        r = det.observe_csf(j, float(v))
        found = r if r is not None else found
    return found


@pytest.mark.parametrize("seed", range(5))
def test_valleys_of_a_noisy_damped_oscillation(seed):
    # CS-Fluctuation itself: a decaying wave with valleys at 60, 140, 220 (period 80) + noise
    t = np.arange(400)
    curve = np.exp(-t / 150) * (1.2 + np.cos(2 * np.pi * (t - 20) / 80))
    curve += np.random.default_rng(seed).normal(0, 0.01, len(t))
    det = TurningPointDetector(window=10)
    tp = feed(det, curve)
    assert len(det.valleys) >= 2 and all(
        abs(v - w) <= 6 for v, w in zip(det.valleys, [60, 140], strict=False)
    )
    assert tp in (130, 140, 150) and abs(tp - det.turning_valley) <= 5


def test_a_small_blip_is_not_a_valley():
    t = np.arange(300)
    base = np.exp(-t / 150) * (1.2 + np.cos(2 * np.pi * (t - 20) / 80))
    blip = base + 0.1 * np.exp(-0.5 * ((t - 120) / 1) ** 2)  # on the falling side: +0.07 decade
    naive = TurningPointDetector(window=10, min_rise=0.0)
    assert feed(naive, blip) is not None and naive.turning_valley < 125  # fooled: the dip before the blip
    guarded = TurningPointDetector(window=10)
    assert feed(guarded, blip) == 140 and len([v for v in guarded.valleys if v < 130]) == 1


def test_a_double_dip_is_merged_into_one_valley():
    t = np.arange(300)
    base = np.exp(-t / 150) * (1.2 + np.cos(2 * np.pi * (t - 20) / 80))
    dip = base + 0.5 * np.exp(-0.5 * ((t - 56) / 2) ** 2)  # a tall narrow bump splits the first valley
    plain = TurningPointDetector(window=10, min_valley_distance=1)
    assert feed(plain, dip) is not None and plain.turning_valley < 80  # two valleys around the bump
    merged = TurningPointDetector(window=10, min_valley_distance=15)
    assert feed(merged, dip) == 140
    assert len([v for v in merged.valleys if v < 100]) == 1


def test_a_plateau_is_not_a_valley_and_the_lag_is_bounded():
    # falls, stays flat for a long time, then rises slowly: no turn within the horizon
    curve = np.concatenate([np.linspace(1, 0.1, 50), np.full(100, 0.1), np.linspace(0.1, 0.105, 100)])
    det = TurningPointDetector(window=5)
    feed(det, curve)
    assert det.valleys == []
    assert det.max_lag == det.horizon + det.min_valley_distance + csf_lag(5) + 5 // 2


def test_detector_needs_consecutive_steps():
    det = TurningPointDetector(window=5)
    det.update(1, 0.0, 1e-4)
    with pytest.raises(ValueError, match="consecutive"):
        det.update(3, 0.0, 1e-4)


def test_snap_never_goes_before_the_first_step():
    det = TurningPointDetector(window=10)
    det._first_step = 7
    assert det._snap(3) == 10 and det._snap(14) == 10 and det._snap(15) == 10 and det._snap(16) == 20


def test_lag_bound_formula_defaults():
    det = TurningPointDetector(window=10)
    assert det.max_lag == 4 * 10 + 10 + 3 * 9 + 5
    assert det.oldest_needed_step(1000) == 1000 - det.max_lag
    assert det.max_lag // det.window + 1 == 9  # boundary snapshots held with the defaults
    assert math.isclose(det.min_rise, 0.1) and det.rule == "guarded"
    assert TurningPointDetector(window=10, rule="paper").max_lag == 3 * 9 + 1 + 5


# ----------------------------------------------------------------------------------------------
# the paper's rule, literally


def second_sign_change(values: list[float]) -> int | None:
    """Algorithm 1 by brute force: the index of the second sample after which the first difference
    turns from - to + (zero differences keep the previous sign)."""
    sign, found = 0, []
    for i in range(1, len(values)):
        d = values[i] - values[i - 1]
        if d > 0 and sign < 0:
            found.append(i - 1)
            if len(found) == 2:
                return found[1]
        if d != 0:
            sign = 1 if d > 0 else -1
    return None


def test_paper_rule_is_algorithm_1_exactly_and_guarded_is_not():
    rng = np.random.default_rng(0)
    differ = 0
    for k in range(500):
        n = int(rng.integers(5, 60))
        values = list(rng.integers(0, 6, n).astype(float))  # ties included
        want = second_sign_change(values)
        paper = TurningPointDetector(window=2, rule="paper")
        got = feed(paper, values)
        assert (paper.turning_valley if got is not None else None) == want, k
        guarded = TurningPointDetector(window=2, min_rise=0.0)
        feed(guarded, [v + 1.0 for v in values])  # log10 needs CSF > 0
        differ += guarded.turning_valley != want
    assert differ > 0  # min_rise = 0 is not the paper's rule (merging, horizon, finality)


def test_guard_is_scale_free_where_a_range_guard_is_blinded_by_the_start_up_spike():
    # a start-up spike 300x the rest, then a wave with valleys at 140 and 220: the guard on log10
    # finds the second valley after the spike; scaling the curve changes nothing.
    t = np.arange(400)
    wave = np.exp(-t / 150) * (1.2 + np.cos(2 * np.pi * (t - 20) / 80))
    curve = wave + 300 * np.exp(-t / 8)
    tp = feed(TurningPointDetector(window=10), curve)
    assert tp == feed(TurningPointDetector(window=10), 1e-6 * curve)
    assert tp is not None and 120 <= tp <= 160


# ----------------------------------------------------------------------------------------------
# window and margin as a fraction of the run; KID subsets


@pytest.mark.parametrize(
    ("value", "steps", "want"),
    [
        (60, 600, 60),
        ("10%", 600, 60),
        (0.05, 600, 30),
        ("5%", 40, 2),
        ("30", 600, 30),
        ({"steps": 40}, 600, 40),
        ({"fraction": 0.1}, 600, 60),
    ],
)
def test_window_in_steps_or_a_fraction(value, steps, want):
    assert window_steps(cfg_for(steps, window=value)) == want


def test_window_and_margin_errors_name_the_key():
    for bad in ("ten", 1.5, -0.1, "0%", 1, True, "0 epochs", {"epochs": -1}, {"steps": 2.5}, {"weeks": 1}):
        with pytest.raises(ConfigError, match="monitor.window"):
            cfg_for(600, window=bad)
    with pytest.raises(ConfigError, match="monitor.margin"):
        cfg_for(600, margin="lots")
    assert margin_steps(cfg_for(600, margin="10%")) == 60 and margin_steps(cfg_for(600, margin=0)) == 0


def test_subset_size_not_smaller_than_the_samples_is_refused(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[data]\ndir = "."\n[eval]\nnum_images = 20\nsubset_size = 20\n')
    with pytest.raises(ConfigError, match=r"eval.subset_size: 20 >= eval.num_images \(20\)"):
        load_config(path)


# ----------------------------------------------------------------------------------------------
# EarlyStop: choosing the returned weights, stopping, rewinding


def fed(select: str, kids: dict[int, tuple[float, float]], **monitor) -> EarlyStop:
    es = EarlyStop(
        None,
        cfg_for(600, select=select, window=10, start_step=0, **monitor),
        has_val_kid=True,
        cs_fn=lambda: 0.0,
    )
    for step, (k, std) in kids.items():
        es.record_kid(
            step, {"kid_val": k, "kid_val_std": std}, TrainState(step, {"w": torch.full((1,), step)})
        )
    return es


def test_best_val_kid_returns_the_best_evaluated_weights_and_says_what_is_within_noise():
    es = fed("best_val_kid", {30: (0.30, 0.05), 60: (0.12, 0.04), 90: (0.15, 0.04), 120: (0.40, 0.05)})
    choice = es.choose(120)
    assert choice == Choice(60, "best_val_kid", (90,))
    assert float(es.snapshot(60).unet_lora["w"][0]) == 60
    assert es.choose(45) == Choice(30, "best_val_kid")  # only what was run by the stop step
    es.rewind(50)
    assert set(es.kids) == {30} and es.snapshot(60) is None


def test_without_validation_kid_the_choice_is_the_turning_point():
    es = EarlyStop(None, cfg_for(600, select="best_val_kid"), has_val_kid=False, cs_fn=lambda: 0.0)
    assert es.select == "turning"
    es.record_kid(30, {"kid_val": 0.1}, TrainState(30, {}))
    assert es.choose(100) == Choice(100, "last")


def test_turning_then_best_stops_a_margin_after_the_confirmation():
    es = fed("turning_then_best", {}, margin=60)
    es.turning_point, es.seen_at = 100, 140
    assert not es.should_stop(199) and es.should_stop(200)
    turning = fed("turning", {})
    turning.turning_point, turning.seen_at = 100, 140
    assert turning.should_stop(140)
    notify = fed("turning_then_best", {}, early_stop="notify")
    notify.turning_point, notify.seen_at = 100, 140
    assert not notify.should_stop(600)


def test_early_stop_ignores_the_warm_up_and_rewinds_the_same_way() -> None:
    """CS of steps <= start is logged, not detected on; a rewind replays with the same rule."""
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(
        LoraConfig(r=2, target_modules=["lin"]), nn.Sequential(collections.OrderedDict(lin=nn.Linear(8, 8)))
    )
    es = EarlyStop(model, cfg_for(12, window=2, early_stop="notify", start_step=5), has_val_kid=False)
    for step in range(1, 13):
        with torch.no_grad():
            model.lin.lora_B["default"].weight.add_(0.01 * step)
        es.observe(step, 1e-3)
    first = es.detector.series[0][0]
    assert len(es.history) == 12 and first >= 6
    before = es.detector.series
    es.rewind(12)
    assert es.detector.series == before
