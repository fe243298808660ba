"""eval.kid_std_target: how the KID spread scales with the sample count, and the count chosen from it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dallm.config import ConfigError, config_from_dict
from dallm.eval.kid import STD_EXPONENT, SampleCount, choose_sample_count, kid
from dallm.protocol import JobEvent, LogEvent

DIM = 16  # a small feature width keeps the test fast; the estimator's scaling does not depend on it


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Thousands of tiny kernel gathers: one thread is ~50x faster than many on a loaded box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gaussian(n: int, shift: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, DIM), generator=gen, dtype=torch.float64) + shift


def mean_std(n: int, shift: float, subset: int | None = None, draws: int = 12) -> float:
    """The KID std (over subsets of `subset`, default n/2) of n samples vs n targets, averaged over
    independent draws of both sets (one draw's std is itself noisy)."""
    stds = []
    for d in range(draws):
        a, b = gaussian(n, shift, 1000 + d), gaussian(n, 0.0, 2000 + d)
        stds.append(kid(a, b, subset_size=subset or n // 2, num_subsets=100, seed=d)[1])
    return float(np.mean(stds))


def fitted_exponent(shift: float) -> float:
    """-slope of log(std) against log(subset size), subsets of half the samples as a job uses them."""
    ns = [20, 40, 80, 160]
    stds = [mean_std(n, shift) for n in ns]
    return float(-np.polyfit(np.log([n // 2 for n in ns]), np.log(stds), 1)[0])


def test_std_falls_as_subset_to_the_minus_one_half_when_distributions_differ() -> None:
    """The unbiased MMD^2's variance is 4 zeta_1 / m + O(1/m^2): std ~ m^-1/2 when the samples differ
    from the targets (a job's case), ~ m^-1 when they are the same distribution (zeta_1 = 0)."""
    differ = fitted_exponent(shift=1.0)  # KID ~7.7, far above its spread
    close = fitted_exponent(shift=0.25)  # KID ~0.2, the spread of the same order (the quickstart's case)
    same = fitted_exponent(shift=0.0)
    assert abs(differ - STD_EXPONENT) < 0.1, differ
    assert STD_EXPONENT < close < same, (close, same)  # in between: 1/2 chooses more than enough
    assert same > 0.85, same


def test_chosen_count_meets_the_target() -> None:
    """Measured at 20 samples (subsets of 10), asked for half the std: the chosen count's measured std
    is the target (an exponent of 1 would choose 40 samples and miss it by sqrt(2))."""
    s0 = mean_std(20, 1.0)
    target = s0 / 2
    count = choose_sample_count(s0, 20, 10, target, 1000, "eval.val_dir", 10_000)
    assert (count.num_images, count.subset_size, count.limit) == (80, 40, "target")
    got = mean_std(count.num_images, 1.0, count.subset_size)
    assert got == pytest.approx(target, rel=0.15), (got, target)
    assert count.predicted_std == pytest.approx(target)


def test_limits_reference_max_images_and_a_loose_target() -> None:
    # 20 held-out images: subsets of at most 10, so a std of 0.158 at 10 cannot reach 0.05
    ref = choose_sample_count(0.158, 20, 10, 0.05, 200, "eval.val_dir", 20)
    assert (ref.num_images, ref.subset_size, ref.limit, ref.needed_subset) == (20, 10, "reference", 100)
    line = ref.describe()
    assert "\n" not in line and "cannot be met" in line and "eval.val_dir has 20 images" in line
    assert "about 200 reference images" in line and "0.158" in line
    capped = choose_sample_count(0.158, 20, 10, 0.05, 60, "eval.val_dir", 1000)
    assert (capped.num_images, capped.subset_size, capped.limit) == (60, 30, "max_images")
    assert "capped by eval.max_images" in capped.describe()
    loose = choose_sample_count(0.1, 40, 20, 0.2, 200, "data.dir", 100)  # 4x looser in variance
    assert (loose.num_images, loose.subset_size, loose.limit) == (10, 5, "target")
    assert loose.subset_size < loose.num_images
    back = SampleCount.from_values(ref.values(), "eval.val_dir")
    assert back == ref


@pytest.mark.parametrize(
    ("values", "key", "reason"),
    [
        ({"kid_std_target": 0}, "eval.kid_std_target", "greater than 0"),
        ({"kid_std_target": "precise"}, "eval.kid_std_target", "number"),
        ({"num_images": 40, "max_images": 30}, "eval.max_images", "below eval.num_images (40)"),
        ({"max_images": 1}, "eval.max_images", "greater than or equal to 2"),
    ],
)
def test_bad_precision_settings_name_the_key(values: dict, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"data": {"dir": "/tmp/images"}, "eval": values})
    msg = str(e.value)
    assert "\n" not in msg and f"{key}: " in msg and reason in msg, msg


def test_precision_settings_load() -> None:
    cfg = config_from_dict(
        {"data": {"dir": "/tmp/images"}, "eval": {"kid_std_target": 0.05, "max_images": 80}}
    )
    assert (cfg.eval.kid_std_target, cfg.eval.max_images) == (0.05, 80)
    assert config_from_dict({"data": {"dir": "/tmp/images"}}).eval.kid_std_target is None


def test_added_images_keep_the_first_ones_noise_and_prompts(
    tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path
) -> None:
    """A count chosen above eval.num_images adds images after the first ones, which stay exactly the
    images (and base features) of a job without a target; a different count is a cache miss."""
    from test_evaluation import FakeExtractor, make_cfg
    from test_sampling import lora_parts

    from dallm.eval.live import LiveEvaluator

    data, val = image_dir(n=6, captions=True, name="train"), image_dir(n=12, name="val", seed=1)
    parts = lora_parts(tiny_sd, nonzero=False)

    def refs(out: str, **ev: Any) -> tuple[LiveEvaluator, dict[str, torch.Tensor]]:
        cfg = make_cfg(
            data, tmp_path / out, val, samples={"every": 0}, eval={"cache_dir": str(tmp_path / "c")} | ev
        )
        live = LiveEvaluator(cfg, parts, tmp_path / out, lambda e: None, torch.device("cpu"), torch.float32,
                             ["a red circle <s1>"], extractor=FakeExtractor())  # fmt: skip
        return live, live.references()

    plain, fixed = refs("plain")
    chosen, more = refs("chosen", kid_std_target=1e-6, max_images=8)
    assert chosen.count is not None and (chosen.count.num_images, chosen.count.limit) == (8, "max_images")
    assert len(fixed["base"]) == 4 and len(more["base"]) == 8
    assert torch.equal(more["base"][:4], fixed["base"])  # the first four images are today's
    # the first four came from the shared cache (plain's), only the four added were generated; the
    # 8-image set has a key of its own
    assert (chosen.cache.hits, chosen.cache.misses) == (3, 1)
    added = sorted(p.name for p in (tmp_path / "chosen" / "eval" / "base").glob("*.png"))
    assert added == ["0004.png", "0005.png", "0006.png", "0007.png"]


def test_job_uses_the_chosen_count_through_the_background_evaluator(
    tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path
) -> None:
    """End to end (`dallm.engine.dispatch.train`, eval.mode = "background"): the first evaluation measures the
    std with 4 samples and chooses 8 (capped by max_images); every KID row uses 8, the log says why,
    and eval/summary.json records the count and the reason."""
    from engine_helpers import job as engine_job

    from dallm.engine.dispatch import train

    data, val = image_dir(n=6, captions=True, name="train"), image_dir(n=12, name="val", seed=1)
    # 4 samples to start from, a target no count reaches: 8 (max_images), subsets of 4 (< 6 of val)
    precise = {"kid_std_target": 1e-6, "max_images": 8, "cache_dir": str(tmp_path / "cache")}
    ev = dict(every=2, num_images=4, steps=2, val_dir=str(val), num_subsets=5, mode="background") | precise
    cfg = engine_job(tiny_sd, data, train={"steps": 4}, eval=ev)
    out = tmp_path / "job"
    events: list[JobEvent] = []
    train(cfg, out_dir=out, emit=events.append)
    rows = [json.loads(t) for t in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["eval_num_images"]) for r in rows if "kid_val" in r] == [
        (2, 8.0),
        (3, 8.0),
        (4, 8.0),
    ]
    said = [e.message for e in events if isinstance(e, LogEvent) and e.message.startswith("KID samples: ")]
    assert len(said) == 1 and "capped by eval.max_images" in said[0] and "\n" not in said[0]
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["eval_samples_num_images"] == 8 and summary["eval_samples_subset_size"] == 4
    assert summary["sample_count"] == said[0]
    assert summary["eval_samples_measured_images"] == 4 and summary["eval_samples_measured_std"] > 0
