"""`EvalSchedule`: the one rule for what a job evaluates and when, per job kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from dallm.config import config_from_dict
from dallm.eval.schedule import eval_schedule


def image(**ev: object) -> dict:
    return {"data": {"dir": "."}, "train": {"steps": 100}, "eval": ev}


def llm(**data: object) -> dict:
    return {"model": {"kind": "llm", "base": "micro-llm"}, "data": {"train": ["t.jsonl"], **data},
            "train": {"steps": 100}, "eval": {"every": 10}}  # fmt: skip


def test_an_image_job_measures_at_the_end_with_a_validation_folder_or_prompts_only() -> None:
    off = eval_schedule(config_from_dict(image()))
    assert not off.active and not any(off.due(s) for s in range(1, 101))
    end = eval_schedule(config_from_dict(image(val_dir="val")))
    assert end.active and end.measures and end.validation and not end.compares_validation
    assert not any(end.due(s) for s in range(1, 101))  # measured at the end only
    assert eval_schedule(config_from_dict(image(prompts=["a"]))).measures
    every = eval_schedule(config_from_dict(image(every=25, val_dir="val")))
    assert [s for s in range(0, 101) if every.measure_due(s)] == [25, 50, 75, 100]
    assert every.compares_validation


def test_samples_are_due_on_their_own_schedule() -> None:
    cfg = config_from_dict(image(every=4) | {"samples": {"every": 6, "prompts": ["a"]}})
    s = eval_schedule(cfg)
    assert [n for n in range(1, 13) if s.due(n)] == [4, 6, 8, 12]
    assert [n for n in range(1, 13) if s.samples_due(n)] == [6, 12]


@pytest.mark.parametrize(("data", "validation"), [({}, False), ({"val_fraction": 0.2}, True),
                                                  ({"validation": [Path("v.jsonl")]}, True)])  # fmt: skip
def test_an_llm_job_measures_on_its_schedule_only(data: dict, validation: bool) -> None:
    cfg = config_from_dict(llm(**data))
    s = eval_schedule(cfg)
    assert s.measures and s.validation is validation and s.compares_validation is validation
    assert not s.with_validation(False).compares_validation
    cfg.eval.every = 0
    assert not eval_schedule(cfg).measures  # no measure at the end without a schedule
