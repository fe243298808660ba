"""Live evaluation on the tiny model: sample grids, KID to train / validation / base, caching, cost."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_sampling import lora_parts

from dallm.config import ConfigError, JobConfig, config_from_dict
from dallm.eval.live import LiveEvaluator
from dallm.protocol import (
    FinishedEvent,
    JobEvent,
    LogEvent,
    MetricsEvent,
    PhaseEvent,
    SampleEvent,
    StartedEvent,
)

KID_KEYS = {f"kid_{r}{s}" for r in ("train", "val", "base") for s in ("", "_std")}


class FakeExtractor:
    """Colour features that mean something for the tiny model: a 4x4 thumbnail and the mean colour."""

    def __init__(self) -> None:
        self.pil_images = 0
        self.tensor_images = 0

    def __call__(self, images: Any) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            self.tensor_images += len(images)
            x = images.float()
        else:
            self.pil_images += len(images)
            arrays = [np.asarray(im.convert("RGB").resize((16, 16)), dtype=np.float32) / 255 for im in images]
            x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        x = F.interpolate(x, size=(4, 4), mode="area")
        return torch.cat([x.flatten(1), x.mean((2, 3))], 1)


def make_cfg(data: Path, out: Path, val: Path | None = None, **sections: dict[str, Any]) -> JobConfig:
    raw: dict[str, Any] = {
        "seed": 3,
        "output_dir": str(out),
        "data": {"dir": str(data)},
        "train": {"steps": 6},
        "monitor": {"window": 2},
        "eval": {"every": 2, "num_images": 4, "steps": 3, "guidance": 2.0, "batch_size": 4, "num_subsets": 5},
        "samples": {
            "every": 2,
            "prompts": ["a red circle", "a blue square <s1>"],
            "seeds": [0, 1],
            "steps": 3,
        },
        "tokens": {"new": ["<s1>"]},
    }
    if val is not None:
        raw["eval"]["val_dir"] = str(val)
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return config_from_dict(raw)


def train_a_little(parts: Any, step: int) -> None:
    """Stand-in for an optimizer step: move the LoRA B matrices."""
    gen = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for name, p in parts.unet.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.fixture
def job(tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path) -> dict[str, Any]:
    data = image_dir(n=6, captions=True, name="train")
    val = image_dir(n=5, name="val", seed=1, size=40)
    events: list[JobEvent] = []
    parts = lora_parts(tiny_sd, nonzero=False)  # B = 0: starts as the base model, like a real job
    return {"data": data, "val": val, "events": events, "parts": parts, "out": tmp_path / "out"}


def evaluator(
    job: dict[str, Any], cfg: JobConfig, extractor: Any = None, prompts: list[str] | None = None
) -> LiveEvaluator:
    return LiveEvaluator(
        cfg,
        job["parts"],
        job["out"],
        job["events"].append,
        torch.device("cpu"),
        torch.float32,
        prompts if prompts is not None else ["a red circle <s1>"] * 6,
        extractor=extractor or FakeExtractor(),
    )


def test_live_job_kid_series_samples_and_cost(job: dict[str, Any]) -> None:
    cfg = make_cfg(job["data"], job["out"], job["val"])
    ext = FakeExtractor()
    ev = evaluator(job, cfg, ext)
    series: dict[int, dict[str, float]] = {}
    for step in range(1, 6):
        train_a_little(job["parts"], step)
        assert ev.due(step) == (step % 2 == 0)
        if ev.due(step):
            series[step] = ev.run(step)
    assert sorted(series) == [2, 4]
    # Each stop names its phases before its work: the grid, then KID (its metrics follow in the row).
    seen = [(e.phase, e.step) if isinstance(e, PhaseEvent) else (e.kind, e.step) for e in job["events"]
            if isinstance(e, PhaseEvent | SampleEvent)]  # fmt: skip
    # The base model's grid is made (and sent, as step 0) with the first one.
    stops = [(k, s) for s in (2, 4) for k in ("sampling", "sample", "kid")]
    assert seen == [*stops[:1], ("sample", 0), *stops[1:]]
    assert series[4]["eval_stop_seconds"] == pytest.approx(
        (series[2]["eval_seconds"] + series[4]["eval_seconds"]) / 2
    )
    for values in series.values():
        assert set(values) >= KID_KEYS and values["eval_seconds"] > 0 and 0 < values["eval_share"] <= 1
        assert all(np.isfinite(v) for v in values.values())
    assert series[2]["kid_base"] != series[4]["kid_base"]
    base_levels = {"base_kid_train", "base_kid_train_std", "base_kid_val", "base_kid_val_std"}
    assert base_levels <= set(series[2]) and all(series[2][k] == series[4][k] for k in base_levels)
    # Targets once: 6 train + 5 val PIL images; generated: base once + 2 evaluations, 4 images each.
    assert ext.pil_images == 11 and ext.tensor_images == 3 * 4 and ev.base_generations == 1
    assert (job["out"] / "eval" / "base_features.pt").is_file()
    assert len(list((job["out"] / "eval" / "base").glob("*.png"))) == 4

    done = ev.finish(5)
    assert set(done) >= KID_KEYS
    assert done["eval_count"] == 3 and done["eval_seconds_total"] > 0 and 0 < done["eval_share"] < 1
    held = HeldWeights()
    res = ev.result(4, 4, 5, held)  # an evaluated step: reused, not measured again
    assert held.entered == 0  # nor its weights loaded
    assert res["result_kid_val"] == res["turning_kid_val"] == series[4]["kid_val"]
    assert ev.summary()["eval_count"] == 3
    summary = json.loads((job["out"] / "eval" / "summary.json").read_text())
    assert summary["result_step"] == 4 and summary["result_kid_val_std"] == series[4]["kid_val_std"]
    assert ev.base_generations == 1 and ext.pil_images == 11

    samples = [e for e in job["events"] if isinstance(e, SampleEvent)]
    assert [e.step for e in samples] == [0, 2, 4, 5]
    assert [e.base for e in samples] == [True, False, False, False]
    assert samples[0].path == "samples/base.png" and samples[1].seeds == list(cfg.samples.seeds)
    samples = samples[1:]
    assert samples[0].path == "samples/step-000002.png" and samples[0].png.startswith(b"\x89PNG")
    with Image.open(job["out"] / samples[0].path) as im:
        assert im.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 2 prompts x 2 seeds of 16 px
    assert (job["out"] / "samples" / "base.png").is_file()
    assert (job["out"] / "samples" / "evolution-01.gif").is_file()
    metrics = [e for e in job["events"] if isinstance(e, MetricsEvent)]
    assert [e.step for e in metrics] == [5]  # run()'s values go out with the engine's own row
    assert any(isinstance(e, LogEvent) and "wall time" in e.message for e in job["events"])
    assert (job["out"] / "eval" / "summary.json").is_file()


def test_same_weights_give_identical_grids(job: dict[str, Any]) -> None:
    cfg = make_cfg(job["data"], job["out"], eval={"every": 0})
    ev = evaluator(job, cfg)
    train_a_little(job["parts"], 1)
    ev.run(2)
    ev.run(4)  # no training between: the same image
    train_a_little(job["parts"], 5)
    ev.run(6)
    grid = {s: (job["out"] / "samples" / f"step-{s:06d}.png").read_bytes() for s in (2, 4, 6)}
    assert grid[2] == grid[4]
    assert grid[4] != grid[6]
    assert not ev.schedule.measures


def test_base_cache_is_reused_on_resume_and_invalidated_by_settings(job: dict[str, Any]) -> None:
    cfg = make_cfg(job["data"], job["out"], samples={"every": 0})
    first = evaluator(job, cfg)
    first.run(2)
    assert first.base_generations == 1
    resumed = evaluator(job, cfg)
    resumed.run(4)
    assert resumed.base_generations == 0
    assert torch.equal(resumed.references()["base"], first.references()["base"])
    changed = evaluator(job, make_cfg(job["data"], job["out"], samples={"every": 0}, eval={"steps": 4}))
    changed.run(2)
    assert changed.base_generations == 1


def test_base_prompts_drop_learned_tokens(job: dict[str, Any]) -> None:
    cfg = make_cfg(job["data"], job["out"], tokens={"new": ["<s1>", "<s2>"]})
    ev = evaluator(job, cfg, prompts=["a cat like <s1><s2>", "a dog <s1>"])
    assert ev.eval_prompts == ["a cat like <s1><s2>", "a dog <s1>", "a cat like <s1><s2>", "a dog <s1>"]
    assert ev.base_prompts == ["a cat like", "a dog", "a cat like", "a dog"]
    cfg = make_cfg(job["data"], job["out"], tokens={"new": ["<s1>", "<s2>"], "init_word": "plain"})
    ev = evaluator(job, cfg, prompts=["a cat in <s1><s2> style"])
    assert ev.base_prompts[0] == "a cat in plain style"


def test_twenty_images_against_five_targets(job: dict[str, Any], image_dir: Callable[..., Path]) -> None:
    """A subset size not smaller than a reference set is lowered to half of it, with one warning."""
    few = image_dir(n=5, name="few")
    cfg = make_cfg(few, job["out"], samples={"every": 0}, eval={"num_images": 20, "subset_size": 10})
    ev = evaluator(job, cfg)
    values = ev.run(2)
    assert {"kid_train", "kid_base"} <= set(values) and "kid_val" not in values
    assert np.isfinite(values["kid_train"]) and np.isfinite(values["kid_base"])
    assert values["kid_train_std"] > 1e-9  # subsets of 2 of the 5 targets: a real spread
    ev.run(4)
    warned = [e.message for e in job["events"] if isinstance(e, LogEvent) and e.level == "warning"]
    tail = "KID subset size 10 >= the smaller set (5 samples): every subset would be the whole set and the spread 0; using 2"
    assert warned == [f"kid_train: {tail}", f"base_kid_train: {tail}"]  # once each, not per evaluation


class HeldWeights:
    """The job's `_loaded(state)`: counts how often the evaluator put the result's weights in."""

    def __init__(self) -> None:
        self.entered = 0

    def __enter__(self) -> None:
        self.entered += 1

    def __exit__(self, *exc: object) -> None:
        return None


def test_result_not_evaluated_is_measured_from_the_weights_held(job: dict[str, Any]) -> None:
    cfg = make_cfg(job["data"], job["out"], samples={"every": 0}, eval={"every": 4})
    ev = evaluator(job, cfg)
    train_a_little(job["parts"], 1)
    held = HeldWeights()
    out = ev.result(1, None, 3, held)
    assert held.entered == 1  # measured with the result's weights in the model
    assert {"result_kid_train", "result_kid_base"} <= set(out) and 1 in ev.kid_history
    assert out.keys().isdisjoint({"turning_kid_train"})  # the turning point was not evaluated


def test_nothing_configured_means_nothing_due(job: dict[str, Any]) -> None:
    cfg = make_cfg(job["data"], job["out"], samples={"every": 0}, eval={"every": 0})
    ev = evaluator(job, cfg)
    assert not any(ev.due(s) for s in range(1, 20))
    assert set(ev.finish(19)) == {
        "eval_count",
        "eval_seconds_total",
        "eval_seconds_mean",
        "eval_setup_seconds",
        "sample_seconds_total",
        "eval_share",
        "wall_seconds",
        "eval_cache_hits",
        "eval_cache_misses",
    }
    assert not (job["out"] / "samples").exists()


def test_end_only_evaluation_with_val_dir(job: dict[str, Any]) -> None:
    cfg = make_cfg(job["data"], job["out"], job["val"], samples={"every": 0}, eval={"every": 0})
    ev = evaluator(job, cfg)
    assert not ev.due(2)
    assert set(ev.finish(6)) >= KID_KEYS
    assert [e.step for e in job["events"] if isinstance(e, MetricsEvent)] == [6]


def test_unusable_folders_fail_early(job: dict[str, Any], image_dir: Callable[..., Path]) -> None:
    with pytest.raises(ConfigError, match=r"eval.val_dir: folder .*missing does not exist"):
        evaluator(job, make_cfg(job["data"], job["out"], job["out"].parent / "missing"))
    one = image_dir(n=1, name="one")
    with pytest.raises(ConfigError, match=r"eval.val_dir: KID needs at least 2 images, .* has 1"):
        evaluator(job, make_cfg(job["data"], job["out"], one))


def test_engine_job_with_evaluation_then_report(
    tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through `dallm.engine.dispatch.train`: the KID series for all three references lands in metrics.jsonl,
    the final summary in result.json, and `dallm report` draws every plot from the folder."""
    import json

    from engine_helpers import job as engine_job

    from dallm.engine.dispatch import train
    from dallm.report.job import write_report

    monkeypatch.setattr("dallm.eval.live.configured_extractor", lambda cfg, device: FakeExtractor())
    data = image_dir(n=6, captions=True, name="train")
    val = image_dir(n=5, name="val", seed=1)
    cfg = engine_job(
        tiny_sd,
        data,
        eval={"every": 2, "num_images": 4, "steps": 3, "val_dir": str(val), "num_subsets": 5},
        samples={"every": 2, "prompts": ["a red circle", "a cat"], "seeds": [0, 1], "steps": 3},
    )
    out = tmp_path / "job"
    events: list[JobEvent] = []
    train(cfg, out_dir=out, emit=events.append)
    (started,) = [e for e in events if isinstance(e, StartedEvent)]
    assert (started.job_kind, started.validation_measure, started.eval_every) == ("image", "kid_val", 2)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kid_steps = [r["step"] for r in rows if "kid_val" in r]
    assert kid_steps == [2, 3, 4, 6]  # eval.every and the checkpoint steps (checkpoint.every = 3)
    assert all(set(r) >= KID_KEYS and r["eval_seconds"] > 0 for r in rows if "kid_val" in r)
    # the repeatable validation loss on eval.val_dir, and the base model's (no fidelity judge here)
    assert all({"val_loss", "val_loss_t990", "base_val_loss"} <= set(r) for r in rows if "kid_val" in r)
    assert not any("fidelity" in r for r in rows)
    result = json.loads((out / "result.json").read_text())
    assert result["eval"]["eval_count"] == 4 and 0 < result["eval"]["eval_share"] < 1
    assert [e.step for e in events if isinstance(e, SampleEvent)] == [0, 2, 4, 6]  # 0: the base
    # the live stream carries the same KID as the log (the daemon and the TUI only see events)
    live = {e.step: e.values for e in events if isinstance(e, MetricsEvent) and "kid_val" in e.values}
    assert sorted(live) == [2, 3, 4, 6]
    assert all(live[r["step"]]["kid_val"] == r["kid_val"] for r in rows if "kid_val" in r)
    finished = [e for e in events if isinstance(e, FinishedEvent)]
    best = min(live, key=lambda s: live[s]["kid_val"])  # select: the best validation KID evaluated
    assert (
        finished[0].result_step == best == result["result_step"] and result["selected_by"] == "best_val_kid"
    )
    assert finished[0].result_kid_val == live[best]["kid_val"]
    assert finished[0].result_kid_val_std == live[best]["kid_val_std"] > 0
    assert result["stop_step"] == 6 and result["steps_saved"] == 0
    written = write_report(out)
    assert all(isinstance(p, Path) and p.is_file() for p in written.values()), written


def test_unusable_feature_extractor_fails_before_training(job: dict[str, Any], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "pt_inception-2015-12-05.pth"
    cfg = make_cfg(job["data"], job["out"], eval={"features": "inception", "inception_weights": str(missing)})
    with pytest.raises(ConfigError, match=r"^eval.features: .*pt_inception-2015-12-05"):
        LiveEvaluator(
            cfg, job["parts"], job["out"], job["events"].append, torch.device("cpu"), torch.float32, []
        )


def test_micro_feature_net_through_load_extractor(job: dict[str, Any]) -> None:
    """The real (shipped) "micro" extractor on the tiny model's 16 px images."""
    from dallm.eval.inputs import configured_extractor

    cfg = make_cfg(job["data"], job["out"], job["val"], samples={"every": 0}, eval={"features": "micro"})
    ev = LiveEvaluator(
        cfg, job["parts"], job["out"], job["events"].append, torch.device("cpu"), torch.float32, ["a cat"]
    )
    assert ev.extractor is not None and configured_extractor(cfg, torch.device("cpu")) is not None
    values = ev.run(2)
    assert set(values) >= KID_KEYS and all(np.isfinite(v) for v in values.values())


def test_rollback_and_resume_supersedes_recorded_steps(job: dict[str, Any]) -> None:
    cfg = make_cfg(job["data"], job["out"], samples={"every": 0})
    ev = evaluator(job, cfg)
    train_a_little(job["parts"], 1)
    first = ev.run(2)
    ev.run(4)
    train_a_little(job["parts"], 2)  # rolled back to step 1, resumed: other weights at step 2
    again = ev.run(2)
    assert again["kid_train"] != first["kid_train"]
    assert sorted(ev.kid_history) == [2] and ev.kid_history[2]["kid_train"] == again["kid_train"]
    assert ev.finish(2)["kid_train"] == again["kid_train"]  # the final step's evaluation is reused
