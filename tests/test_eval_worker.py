"""Evaluation off the training path (`dallm.eval.background`) and the shared feature cache (`dallm.eval.cache`)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import job as engine_job
from test_evaluation import FakeExtractor, make_cfg

from dallm.config import ConfigError, JobConfig, config_from_dict
from dallm.eval.background import BackgroundEvaluator, EvaluationError
from dallm.eval.live import LiveEvaluator
from dallm.protocol import JobEvent, LogEvent, MetricsEvent, PhaseEvent, SampleEvent


def _setup(tiny_sd: Path, image_dir: Callable[..., Path], **eval_cfg: Any) -> tuple[JobConfig, Any]:
    from dallm.image.data import load_training_data
    from dallm.image.models import load_parts
    from dallm.image.trainer import ImageTrainer

    data = image_dir(n=6, captions=True, name="train")
    val = image_dir(n=5, name="val", seed=1)
    cfg = engine_job(
        tiny_sd,
        data,
        tokens={"new": ["<s1>"]},
        eval={"every": 2, "num_images": 6, "steps": 2, "val_dir": str(val), "num_subsets": 5} | eval_cfg,
    )
    parts = load_parts(cfg.model)
    images, _ = load_training_data(cfg.data, 16)
    return cfg, ImageTrainer(cfg, parts, images, None, torch.device("cpu"))


def _background(
    tiny_sd: Path, image_dir: Callable[..., Path], out: Path, **eval_cfg: Any
) -> tuple[BackgroundEvaluator, Any]:
    cfg, trainer = _setup(tiny_sd, image_dir, **eval_cfg)
    bg = BackgroundEvaluator(cfg, trainer.parts, out, lambda e: None, torch.device("cpu"),
                             torch.float32, ["a cat"], trainer.weights)  # fmt: skip
    return bg, trainer


def _move(trainer: Any, seed: int) -> None:
    """Stand-in for optimizer steps: move every LoRA B matrix and the token row."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in trainer.parts.unet.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        trainer.tokens.set_rows(torch.randn(trainer.tokens.rows().shape, generator=gen))


def test_background_gives_the_inline_kid_in_step_order(
    tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path
) -> None:
    cfg, trainer = _setup(tiny_sd, image_dir)
    prompts = ["a red circle <s1>"] * 3
    inline = LiveEvaluator(cfg, trainer.parts, tmp_path / "a", lambda e: None, torch.device("cpu"),
                           torch.float32, prompts)  # fmt: skip
    events: list[JobEvent] = []
    bg = BackgroundEvaluator(cfg, trainer.parts, tmp_path / "b", events.append, torch.device("cpu"),
                             torch.float32, prompts, trainer.weights)  # fmt: skip
    try:
        expected = {}
        for step, seed in ((2, 1), (4, 2), (6, 3)):
            _move(trainer, seed)
            expected[step] = inline.evaluate(step)
            bg.submit(step, trainer.weights)  # a copy: moving the weights on does not change it
        assert bg.pending() == [2, 4, 6]
        arrived = bg.collect(wait_upto=6)
        assert [a.step for a in arrived] == [2, 4, 6] and bg.pending() == []
        for a in arrived:
            for key, value in expected[a.step].items():
                assert a.values[key] == pytest.approx(value, abs=1e-6), (a.step, key)
            assert a.state is not None and a.state.step == a.step
        assert len({a.values["kid_val"] for a in arrived}) == 3  # the weights did differ
        # the blocking path (final / result KID) is the same computation
        final = bg.evaluate(6)
        assert final["kid_val"] == pytest.approx(expected[6]["kid_val"], abs=1e-6)
        assert bg.summary()["eval_worker_seconds"] > 0 and bg.trainer_seconds() > 0
    finally:
        bg.close()
    assert not bg._proc.is_alive()


def test_a_dead_evaluator_process_is_an_error_not_a_hang(
    tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path
) -> None:
    bg, trainer = _background(tiny_sd, image_dir, tmp_path)
    try:
        bg.submit(2, trainer.weights)
        os.kill(bg._proc.pid, signal.SIGKILL)
        with pytest.raises(EvaluationError, match=r"died \(exit code -9\) with step\(s\) \[2\] pending"):
            bg.collect(wait_upto=2)
    finally:
        bg.close()


def test_a_failing_evaluator_process_says_why(
    tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path
) -> None:
    bg, trainer = _background(tiny_sd, image_dir, tmp_path, features=f"clip:{tmp_path / 'no-such-clip'}")
    try:
        bg.submit(2, trainer.weights)
        with pytest.raises(
            EvaluationError, match=r"^background evaluation failed while starting: ConfigError: eval.features"
        ):
            bg.collect(wait_upto=2)
    finally:
        bg.close()


def test_job_in_background_mode_logs_kid_in_its_rows_in_step_order(
    tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path
) -> None:
    from dallm.engine.dispatch import train
    from dallm.protocol.files import checkpoint_folders, read_metrics

    data = image_dir(n=6, captions=True, name="train")
    val = image_dir(n=5, name="val", seed=1)
    cfg = engine_job(
        tiny_sd,
        data,
        train={"steps": 8},
        checkpoint={"every": 4},
        eval={
            "every": 2,
            "num_images": 4,
            "steps": 2,
            "val_dir": str(val),
            "num_subsets": 5,
            "mode": "background",
        },
        samples={"every": 4, "prompts": ["a red circle"], "seeds": [0], "steps": 2},
    )
    out = tmp_path / "job"
    events: list[JobEvent] = []
    result = train(cfg, out_dir=out, emit=events.append)
    lines = [json.loads(t) for t in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines]
    assert steps == sorted(set(steps)), steps  # one row a step, in order: KID went into its row
    assert [r["step"] for r in lines if "kid_val" in r] == [2, 4, 6, 8]
    assert all("loss" in r for r in lines if "kid_val" in r)
    live = [e.step for e in events if isinstance(e, MetricsEvent)]
    assert live[:8] == list(range(1, 9))  # one event a step, in order, the KID in its step's event
    assert [e.step for e in events if isinstance(e, MetricsEvent) and "kid_val" in e.values][:4] == [
        2,
        4,
        6,
        8,
    ]
    assert [e.step for e in events if isinstance(e, SampleEvent) and not e.base] == [4, 8]
    # each checkpoint's history holds the KIDs up to its step
    folders = checkpoint_folders(out / "checkpoints")
    assert [s for s, _ in folders] == [4, 8]
    for step, folder in folders:
        saved = read_metrics(folder / "metrics.jsonl")
        assert [r["step"] for r in saved if "kid_val" in r] == [s for s in (2, 4, 6, 8) if s <= step]
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["eval_worker_seconds"] > 0 and 0 <= summary["eval_share"] < 1
    assert result.result_kid_val is not None
    kids = {r["step"]: r["kid_val"] for r in lines if "kid_val" in r}
    assert result.result_step == min(kids, key=lambda s: kids[s])  # best_val_kid saw every KID
    waits = [e for e in events if isinstance(e, LogEvent) and "waiting for the background" in e.message]
    assert waits and any(isinstance(e, PhaseEvent) and e.phase == "kid" for e in events)


def test_feature_cache_hits_and_misses_by_what_makes_the_features(
    tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path, private_eval_cache: Path
) -> None:
    from test_sampling import lora_parts

    data = image_dir(n=6, captions=True, name="train")
    val = image_dir(n=5, name="val", seed=1)
    parts = lora_parts(tiny_sd, nonzero=False)

    def references(n: int, seed: int = 3, **sections: dict[str, Any]) -> LiveEvaluator:
        cfg = make_cfg(data, tmp_path / f"out{n}", val, **sections).model_copy()
        cfg.seed = seed
        ev = LiveEvaluator(cfg, parts, tmp_path / f"out{n}", lambda e: None, torch.device("cpu"),
                           torch.float32, ["a red circle <s1>"] * 6, extractor=FakeExtractor())  # fmt: skip
        ev.references()
        return ev

    first = references(1)
    assert (first.cache.hits, first.cache.misses, first.base_generations) == (0, 3, 1)
    assert len(list(private_eval_cache.glob("*.pt"))) == 3
    again = references(2)  # another job, same base, prompts, seeds, sampler: nothing generated
    assert (again.cache.hits, again.cache.misses, again.base_generations) == (3, 0, 0)
    assert torch.equal(again.references()["base"], first.references()["base"])
    other_seed = references(3, seed=4)
    assert (other_seed.cache.hits, other_seed.cache.misses, other_seed.base_generations) == (2, 1, 1)
    fewer_steps = references(4, eval={"steps": 2})
    assert fewer_steps.base_generations == 1
    off = references(5, eval={"cache": False})
    assert (off.cache.hits, off.cache.misses, off.base_generations) == (0, 0, 1)


def test_eval_mode_must_be_inline_or_background(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"eval\.mode") as e:
        config_from_dict({"data": {"dir": str(tmp_path)}, "eval": {"mode": "sideways"}})
    assert "\n" not in str(e.value)


def test_the_evaluator_process_ends_when_the_trainer_is_killed(
    tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path
) -> None:
    """A trainer killed with SIGKILL cannot ask its evaluator to end: the evaluator notices."""
    import subprocess
    import sys
    import time

    import psutil

    data = image_dir(n=6, captions=True, name="train")
    script = f"""
import sys, time, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from engine_helpers import job
from dallm.image.data import load_training_data
from dallm.eval.background import BackgroundEvaluator
from dallm.image.models import load_parts
from dallm.image.trainer import ImageTrainer
cfg = job({str(tiny_sd)!r}, {str(data)!r}, eval={{"every": 2, "num_images": 4, "steps": 2}})
parts = load_parts(cfg.model)
images, _ = load_training_data(cfg.data, 16)
trainer = ImageTrainer(cfg, parts, images, None, torch.device("cpu"))
bg = BackgroundEvaluator(cfg, parts, {str(tmp_path / "out")!r}, lambda e: None, torch.device("cpu"),
                         torch.float32, ["a cat"], trainer.weights)
print(bg._proc.pid, flush=True)
time.sleep(600)
"""
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(trainer.stdout.readline())  # type: ignore[union-attr]
        assert psutil.pid_exists(child)
        trainer.kill()
        trainer.wait()
        deadline = time.monotonic() + 300  # it checks every second; the margin is for a loaded box

        def alive(pid: int) -> bool:
            try:
                return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        while alive(child):
            assert time.monotonic() < deadline, "the evaluator process outlived its trainer"
            time.sleep(0.5)
    finally:
        trainer.kill()
