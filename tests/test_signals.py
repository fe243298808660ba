"""Issue 23's signals in a running job: validation loss, prompt fidelity, the validation KID's std of
the mean and the evidence kept per step (dallm.eval.signals), the schedule's checkpoint steps,
monitor.select = "evidence" (EarlyStop.choose with the evaluator's evidence, result.json, the
summary row), and how the figures are labelled (dallm.protocol.labels, `dallm ls`/`show` lines)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dallm.config import config_from_dict, load_config
from dallm.eval.evidence import job_evidence
from dallm.eval.kid_spread import kid_mean
from dallm.eval.schedule import eval_schedule
from dallm.eval.signals import REFS_FILE, evidence_file, kid_values, measures_of
from dallm.monitor.early_stop import EarlyStop
from dallm.monitor.selection import Evidence, EvidenceSet
from dallm.protocol import FinishedEvent, JobEvent, JobSummary, LogEvent, MetricsEvent, StartedEvent
from dallm.protocol.labels import figures_lines, validation_text

REPO = Path(__file__).resolve().parent.parent


# -- the schedule: measures at checkpoint steps ---------------------------------------------------


def test_the_measures_are_due_at_checkpoint_steps_too(tmp_path: Path) -> None:
    cfg = config_from_dict(
        {
            "data": {"dir": str(tmp_path)},
            "eval": {"every": 30},
            "checkpoint": {"every": 100},
            "train": {"steps": 300},
        }
    )
    s = eval_schedule(cfg)
    due = [step for step in range(1, 301) if s.measure_due(step)]
    assert due == [30, 60, 90, 100, 120, 150, 180, 200, 210, 240, 270, 300]
    # without a schedule there is nothing to compare: checkpoints alone do not start evaluations
    off = eval_schedule(config_from_dict({"data": {"dir": str(tmp_path)}, "checkpoint": {"every": 100}}))
    assert not any(off.measure_due(step) for step in range(1, 301))


# -- the KID spread and the evidence ---------------------------------------------------------------


def test_the_validation_kid_std_is_the_std_of_the_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, 8, generator=gen), torch.randn(40, 8, generator=gen) + 0.3
    values = kid_values("kid_val", a, b, 200, 0)
    m = kid_mean(a, b, n_boot=200, seed=0)
    assert values == {"kid_val": m.mean, "kid_val_std": m.std}
    assert measures_of(values | {"eval_seconds": 1.0, "val_loss": 0.2, "base_fidelity": 0.9}) == values | {
        "val_loss": 0.2,
        "base_fidelity": 0.9,
    }


def test_job_evidence_pairs_the_kept_features_and_falls_back_to_the_figures(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    refs = torch.randn(12, 6, generator=gen)
    shifts = {10: 1.0, 20: 0.2, 30: 0.6}
    history = {}
    for step, shift in shifts.items():
        path = evidence_file(tmp_path, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"features": torch.randn(10, 6, generator=gen) + shift}, str(path))
        history[step] = {
            "kid_val": shift,
            "val_loss": shift / 10,
            "fidelity": 1 - shift / 4,
            "base_fidelity": 1.0,
        }
    save_file({"features": refs}, str(tmp_path / "eval" / "evidence" / REFS_FILE))
    found = job_evidence(tmp_path, history, [10, 20, 30], n_boot=50)
    assert found is not None and found.paired is not None and found.base_fidelity == 1.0
    by_step = {r.step: r for r in found.records}
    assert sorted(by_step) == [10, 20, 30]
    assert all(r.kid_report is not None and r.kid_std is not None for r in found.records)
    assert by_step[20].kid < by_step[10].kid and by_step[20].val_loss == pytest.approx(0.02)
    diff, low, high = found.paired(10, 20)
    assert diff > 0 and low <= diff <= high
    # no features kept (an older job, or too few references): the logged figures, unpaired
    bare = job_evidence(tmp_path / "none", history, [10, 20], n_boot=50)
    assert bare is not None and bare.paired is None and [r.kid for r in bare.records] == [1.0, 0.2]
    assert job_evidence(tmp_path, history, [40]) is None


def _early(tmp_path: Path, select: str) -> EarlyStop:
    cfg = config_from_dict(
        {
            "data": {"dir": str(tmp_path)},
            "train": {"steps": 100},
            "monitor": {"select": select, "window": 5, "fidelity_margin": 0.2},
            "eval": {"every": 10, "val_dir": str(tmp_path)},
        }
    )
    return EarlyStop(None, cfg, has_validation=True, cs_fn=lambda: 0.0)


class _Snap:
    def __init__(self, step: int) -> None:
        self.step = step

    def copied(self) -> _Snap:
        return self

    def weights_only(self) -> _Snap:
        return self


def test_select_evidence_chooses_with_the_fidelity_guard_and_keeps_best_val_kid_as_it_was(
    tmp_path: Path,
) -> None:
    kids = {10: 0.5, 20: 0.1, 30: 0.2}
    fid = {10: 0.95, 20: 0.5, 30: 0.9}  # step 20 has the lowest KID but ignores the prompt

    def evidence(steps: list[int]) -> EvidenceSet:
        assert steps == [10, 20, 30]  # the evaluated steps whose weights are held
        return EvidenceSet(
            [Evidence(s, kid=kids[s], kid_std=0.001, fidelity=fid[s]) for s in steps], None, 1.0
        )

    early = _early(tmp_path, "evidence")
    for s, k in kids.items():
        early.record_validation(s, k, 0.001, _Snap(s))
    choice = early.choose(30, evidence)
    assert choice.step == 30 and choice.why == "evidence" and choice.selection is not None
    assert choice.selection.excluded == (20,) and "fidelity guard" in choice.selection.signal
    # the other values ignore the evidence
    best = _early(tmp_path, "best_val_kid")
    for s, k in kids.items():
        best.record_validation(s, k, 0.001, _Snap(s))
    assert best.choose(30, evidence).step == 20 and best.choose(30, evidence).why == "best_val_kid"
    # "evidence" stops as "turning_then_best": the margin after the turning point's confirmation
    early.cfg = early.cfg.model_copy(update={"early_stop": "auto"})
    early.seen_at = 50
    assert not early.should_stop(50 + early.margin - 1) and early.should_stop(50 + early.margin)


def test_an_llm_jobs_evidence_is_its_validation_perplexity() -> None:
    from types import SimpleNamespace

    from dallm.llm.evaluation import LlmEvaluator
    from dallm.monitor.selection import select_checkpoint

    fake = SimpleNamespace(history={10: {"ppl_val": 9.0}, 20: {"ppl_val": 7.5}, 30: {"ppl_train": 3.0}})
    found = LlmEvaluator.evidence(fake, [10, 20, 30])  # type: ignore[arg-type]
    assert found is not None and [(r.step, r.val_loss) for r in found.records] == [(10, 9.0), (20, 7.5)]
    assert select_checkpoint(found.records, found.base_fidelity, 0.2, found.paired).signal == "val loss"
    assert LlmEvaluator.evidence(fake, [30]) is None  # type: ignore[arg-type]


# -- labels ---------------------------------------------------------------------------------------


def test_the_summary_row_carries_the_measure_of_the_jobs_kind_with_its_spread_named() -> None:
    row = JobSummary(id=1, name="lm", state="running")
    row = row.apply(StartedEvent(start_step=0, total_steps=10, device="cpu", trainable_params=1, job_kind="llm",
                                 validation_measure="ppl_val"))  # fmt: skip
    row = row.apply(MetricsEvent(step=5, values={"ppl_val": 12.5, "ppl_val_std": 0.4}))
    assert row.validation == 12.5 and row.kid_val is None
    assert validation_text(row) == "ppl 12.5±0.4"
    assert figures_lines(row) == ["validation perplexity: ppl 12.5±0.4 (± std of the mean)"]
    img = JobSummary(id=2, name="qs", state="running", kind="image", validation_measure="kid_val")
    img = img.apply(MetricsEvent(step=30, values={"kid_val": 0.0123, "kid_val_std": 0.004, "val_loss": 0.21,
                                                  "fidelity": 0.85, "base_fidelity": 0.97}))  # fmt: skip
    img = img.apply(FinishedEvent(reason="completed", final_step=60, result_step=30, result_kid_val=0.015,
                                  selection="step 30 by val KID with fidelity guard"))  # fmt: skip
    assert validation_text(img) == "KID 0.0150" and img.selection is not None
    lines = figures_lines(img)
    assert lines[0] == "validation KID: KID 0.0150"  # the held-out half's: no spread measured
    assert "prompt fidelity (held-out prompts): 0.85 (base 0.97)" in lines
    assert lines[-1] == "result chosen by step 30 by val KID with fidelity guard"


# -- a micro job, end to end -----------------------------------------------------------------------


@pytest.mark.xdist_group("micro_quickstart")
def test_a_micro_job_emits_the_signals_and_chooses_on_the_evidence(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "qs"
    sets = [
        f"output_dir={out}",
        "train.steps=16",
        "tokens.ti_steps=4",
        "train.warmup_steps=2",
        "monitor.window=3",
        "monitor.margin=3",
        "monitor.early_stop=notify",
        "monitor.select=evidence",
        "monitor.fidelity_margin=1.0",  # every checkpoint eligible: the validation KID chooses
        "eval.every=6",
        "eval.num_images=8",
        "eval.subset_size=4",
        "eval.steps=2",
        "eval.fidelity_prompts=6",
        "eval.val_loss_timesteps=[10, 500]",
        "eval.kid_bootstrap=50",
        "eval.mode=background",  # the signals come back from the evaluator's process
        "samples.every=0",
        "checkpoint.every=8",
    ]
    from dallm.engine.dispatch import train

    cfg = load_config(REPO / "configs" / "quickstart.toml", sets)
    events: list[JobEvent] = []
    result = train(cfg, emit=events.append)
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    measured = sorted(s for s, r in rows.items() if "kid_val" in r)
    assert measured == [6, 8, 12, 16]  # eval.every and the checkpoint steps
    for s in measured:
        r = rows[s]
        assert {
            "val_loss",
            "val_loss_t10",
            "val_loss_t500",
            "fidelity",
            "fidelity_shape",
            "fidelity_style",
        } <= set(r)
        assert {"base_val_loss", "base_fidelity", "base_fidelity_shape", "kid_val_std"} <= set(r)
        assert 0 <= r["fidelity"] <= 1 and r["val_loss"] > 0
        assert evidence_file(out, s).is_file()
    assert len({rows[s]["base_fidelity"] for s in measured}) == 1  # measured once
    res = json.loads((out / "result.json").read_text())
    assert res["selected_by"] == "evidence" and res["selection"]["signal"].startswith("val KID")
    assert res["result_step"] in measured and res["selection"]["reported_on_held_out_half"]
    assert result.result_kid_val == res["selection"]["reported_kid"]  # the held-out half's KID
    done = [e for e in events if isinstance(e, FinishedEvent)][-1]
    assert done.selection is not None and f"step {res['result_step']}" in done.selection
    logs = " ".join(e.message for e in events if isinstance(e, LogEvent))
    assert "kid_val seen" not in logs
