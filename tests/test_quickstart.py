"""The quickstart on the shipped micro model, shortened: a real alignment, measured live.

The job trains the new tokens alone for 50 steps, then LoRA with them; KID (micro features) to the
training targets, the held-out targets and the base model's samples is measured every 50 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dallm.config import load_config
from dallm.engine.dispatch import train
from dallm.protocol import JobEvent, MetricsEvent

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.xdist_group("micro_quickstart")
def test_quickstart_aligns_the_micro_model_to_the_teacher(tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    sets = [
        f"output_dir={tmp_path / 'qs'}",
        "train.steps=150",
        "monitor.early_stop=notify",
        "eval.every=50",
        "samples.every=0",
        "checkpoint.every=150",
    ]
    cfg = load_config(REPO / "configs" / "quickstart.toml", sets)
    events: list[JobEvent] = []
    result = train(cfg, emit=events.append)
    rows = [json.loads(x) for x in (tmp_path / "qs" / "metrics.jsonl").read_text().splitlines()]
    kid = {r["step"]: r for r in rows if "kid_val" in r}
    assert sorted(kid) == [50, 100, 150]
    assert all({"kid_train", "kid_val", "kid_base", "base_kid_val"} <= set(r) for r in kid.values())
    base = kid[50]["base_kid_val"]  # the base model's own KID to the held-out targets
    # Validation KID falls as the LoRA learns the style, and ends well under the base model's.
    assert kid[150]["kid_val"] < kid[50]["kid_val"], {s: r["kid_val"] for s, r in kid.items()}
    assert kid[150]["kid_val"] <= 0.5 * base, (kid[150]["kid_val"], base)
    # and moves away from the base model's own samples
    assert kid[150]["kid_base"] > kid[50]["kid_base"]
    live = [e.step for e in events if isinstance(e, MetricsEvent) and "kid_val" in e.values]
    assert live[:3] == [50, 100, 150]
    assert result.final_step == 150
