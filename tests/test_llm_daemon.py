# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""An LLM job on the micro LLM through the daemon, end to end: submit, live perplexities and text
samples, the stop at the turning point, a rollback, and `dallm export --format peft`, whose folder
`PeftModel.from_pretrained` loads and which changes the model's output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from daemon_helpers import daemons, home, wait_state, wait_step  # noqa: F401
from test_daemon_e2e import follow_until

from dallm.cli import main as dallm_main
from dallm.micro_llm.data import text_sets, write_text_sets
from dallm.protocol import QUEUE_TOPIC, TERMINAL_STATES, MetricsEvent, SampleEvent, job_topic


@pytest.fixture
def texts(tmp_path: Path) -> dict[str, Path]:
    return write_text_sets(tmp_path / "texts", text_sets(n_train=16, n_val=16, n_base=16, seed=0))


def llm_config(texts: dict[str, Path], name: str, steps: int, **sections: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": name,
        "model": {"kind": "llm", "base": "micro-llm"},
        "data": {k: str(v) for k, v in texts.items()},
        "lora": {"rank": 4},
        "train": {"steps": steps, "batch_size": 4, "lr": 1e-2, "device": "cpu"},
        "monitor": {"window": 3, "early_stop": "auto", "select": "turning"},
        "checkpoint": {"every": 5, "keep": None},
        "samples": {"every": 3, "prompts": ["behold, upon a field of"], "max_new_tokens": 8},
        "eval": {"every": 3},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def follow_until_or_fail(c, sub, job: int, done) -> list:
    """follow_until, naming the job's state and reason (and its log) when it fails first."""
    try:
        return follow_until(sub, job, done, timeout=240)
    except AssertionError:
        s = c.summary(job)
        raise AssertionError(f"job {job}: {s.state} ({s.reason}); log: {c.logs(job).lines[-5:]}") from None


def test_llm_job_through_the_daemon(daemons, texts: dict[str, Path], tmp_path: Path) -> None:
    d = daemons(runner=None, OMP_NUM_THREADS="1")
    with d.client() as c:
        # 1. early stop: the job ends by itself at the turning point's confirmation
        job = c.submit(llm_config(texts, "llm-stop", steps=300))
        with c.subscribe([QUEUE_TOPIC, job_topic(job.id)], since=0) as sub:
            seen = follow_until_or_fail(
                c,
                sub,
                job.id,
                lambda s: (
                    any(isinstance(e.event, SampleEvent) for e in s)
                    and any(isinstance(e.event, MetricsEvent) and "ppl_val" in e.event.values for e in s)
                ),
            )
        sample = next(e.event for e in seen if isinstance(e.event, SampleEvent))
        assert sample.texts and sample.texts[0].startswith("behold, upon a field of") and not sample.png
        values = next(
            e.event.values for e in seen if isinstance(e.event, MetricsEvent) and "ppl_val" in e.event.values
        )
        assert (
            values["ppl_val_std"] > 0 and values["base_ppl_val"] > values["ppl_val"]
        )  # learning the dialect
        s = wait_state(c, job.id, TERMINAL_STATES, timeout=240)
        assert s.state == "stopped-early", s.reason
        result = json.loads((Path(s.out_dir) / "result.json").read_text())
        assert result["reason"] == "early_stop" and result["selected_by"] == "turning"
        assert result["result_step"] == result["turning_point"] < result["final_step"] < 300
        assert result["eval"]["result_ppl_val"] < values["base_ppl_val"]
        assert (Path(s.out_dir) / "samples" / "base.txt").is_file()

        # 2. rollback: finish at an earlier checkpoint, whose adapter is the result
        job2 = c.submit(llm_config(texts, "llm-rollback", steps=400, monitor={"early_stop": "off"}))
        wait_step(c, job2.id, 12, timeout=240)
        c.rollback(job2.id, 5)
        s2 = wait_state(c, job2.id, TERMINAL_STATES, timeout=120)
        assert s2.result_step == 5, (s2.state, s2.reason)
    out = tmp_path / "adapter"
    argv = ["export", str(job2.id), "--home", str(d.home), "--format", "peft", "--out", str(out)]
    assert dallm_main(argv) == 0

    from peft import PeftModel

    from dallm.micro_llm import load
    from dallm.micro_llm.metrics import encode

    base, tok = load()
    ids, _ = encode(tok, ["behold, upon a field of black doth rest a square of red"])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(out)).eval()
        after = tuned(input_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-4)  # the adapter changes the output
    ckpt = Path(s2.out_dir) / "checkpoints" / "step-000005" / "adapter_model.safetensors"
    assert (out / "adapter_model.safetensors").read_bytes() == ckpt.read_bytes()  # step 5's weights
