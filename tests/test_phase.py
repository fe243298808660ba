"""Honest progress: the engine's phase (training, sampling, KID, checkpointing, stopping) folded
into the job's row, and an ETA that counts the evaluations still to come."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from dallm.protocol import (
    JobSummary,
    MetricsEvent,
    PhaseEvent,
    ProgressEvent,
    RolledBackEvent,
    StartedEvent,
    TurningPointEvent,
    eta_seconds,
    phase_text,
    step_text,
    training_line,
)
from dallm.protocol.jobs import evaluations_left


def running(**fields: object) -> JobSummary:
    return JobSummary(id=1, name="j", state="running", **fields)  # type: ignore[arg-type]


def test_reducer_folds_phase_start_and_evaluation_cost() -> None:
    row = running()
    row = row.apply(StartedEvent(start_step=0, total_steps=100, device="cpu", trainable_params=1,
                                 eval_every=20, samples_every=50))  # fmt: skip
    assert (row.eval_every, row.samples_every, row.total_steps) == (20, 50, 100)
    row = row.apply(PhaseEvent(phase="kid", step=40, at=1000.0))
    assert (row.phase, row.phase_since) == ("kid", 1000.0)
    row = row.apply(
        MetricsEvent(step=40, values={"loss": 0.1, "steps_per_s": 2.0, "eval_stop_seconds": 10.0})
    )
    assert (row.step, row.steps_per_s, row.eval_stop_seconds) == (40, 2.0, 10.0)
    assert row.phase == "kid"  # metrics do not end a phase; the next PhaseEvent does
    assert phase_text(row, 1065.0) == "kid 1m05s"
    assert phase_text(row.model_copy(update={"state": "finished"}), 1065.0) == ""


def test_old_rows_and_events_still_parse() -> None:
    """Rows and StartedEvents of an older daemon or engine (no phase fields) read as before."""
    row = JobSummary.model_validate({"id": 1, "name": "j", "state": "running", "step": 3})
    assert (row.phase, row.phase_since, row.eval_every, row.eval_stop_seconds) == ("", None, 0, None)
    ev = StartedEvent.model_validate(
        {"start_step": 0, "total_steps": 5, "device": "cpu", "trainable_params": 1}
    )
    assert (ev.eval_every, ev.samples_every) == (0, 0)
    assert phase_text(row, 0.0) == ""


@pytest.mark.parametrize(
    ("eval_every", "samples_every", "stops"),
    [
        (20, 0, 3),  # 60, 80, 100
        (20, 50, 4),  # 50, 60, 80, 100 (100 once)
        (30, 0, 3),  # 60, 90 and the final evaluation at 100
        (0, 0, 0),
    ],
)
def test_eta_counts_the_evaluations_to_come(eval_every: int, samples_every: int, stops: int) -> None:
    row = running(step=40, total_steps=100, steps_per_s=2.0, eval_every=eval_every,
                  samples_every=samples_every, eval_stop_seconds=10.0)  # fmt: skip
    assert evaluations_left(row) == stops
    assert eta_seconds(row) == pytest.approx(60 / 2.0 + stops * 10.0)


def test_eta_before_any_evaluation_was_measured_is_the_training_part() -> None:
    row = running(step=40, total_steps=100, steps_per_s=2.0, eval_every=20)
    assert eta_seconds(row) == pytest.approx(30.0)
    assert eta_seconds(row.model_copy(update={"state": "queued"})) is None


def test_eta_ends_at_the_stop_the_engine_named() -> None:
    """After "stopping at step 263" the ETA counts to 263, not to total_steps (issue 24); a
    rollback forgets that stop."""
    row = running(step=249, total_steps=600, steps_per_s=2.0)
    assert eta_seconds(row) == pytest.approx(351 / 2.0)
    row = row.apply(TurningPointEvent(step=150, seen_at=233, stop_at=263))
    assert (row.turning_point, row.stop_step) == (150, 263)
    assert eta_seconds(row) == pytest.approx(14 / 2.0)
    assert row.apply(RolledBackEvent(step=100, resume=True)).stop_step is None


def test_the_trainer_step_with_the_evaluations_behind_it() -> None:
    """The rows (MetricsEvent) wait for background evaluations: the step shown is the trainer's
    (ProgressEvent), the backlog beside it, its loss and lr in the row; the ETA counts from it."""
    row = running(total_steps=600, steps_per_s=2.0).apply(MetricsEvent(step=29, values={"loss": 0.5}))
    row = row.apply(ProgressEvent(step=89, values={"loss": 0.25, "lr": 3e-3}, backlog=3))
    assert (row.step, row.train_step, row.loss, row.lr) == (29, 89, 0.25, 3e-3)
    assert step_text(row) == "89/600 (eval 3 behind)"
    assert eta_seconds(row) == pytest.approx(511 / 2.0)
    assert step_text(row.model_copy(update={"state": "finished"})) == "89/600"
    assert training_line(89, 600, {"loss": 0.25, "lr": 3e-3, "steps_per_s": 4.125, "cs": 0.9123}, 3) == (
        "step  89/600  loss 0.2500  lr 3.0e-03  4.12 steps/s  CS 0.912  eval 3 behind"
    )


def test_ls_and_show_name_the_phase_and_an_eta_with_the_evaluations(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from contextlib import contextmanager

    import dallm.cli.jobs as jobs_cli
    from dallm.cli import main
    from dallm.protocol import JobDetail

    row = running(step=40, total_steps=100, steps_per_s=2.0, eval_every=20, eval_stop_seconds=10.0,
                  phase="kid", phase_since=time.time() - 65, kid_val=0.0606, kid_val_std=0.158)  # fmt: skip

    class Client:
        def jobs(self, states: object = None, limit: object = None) -> list[JobSummary]:
            return [row]

        def show(self, job: str) -> JobDetail:
            return JobDetail(summary=row, config={}, transitions=[], checkpoints=[])

    @contextmanager
    def client(args: object) -> Iterator[Client]:
        yield Client()

    monkeypatch.setattr(jobs_cli, "_client", client)
    assert main(["ls"]) == 0
    header, line = capsys.readouterr().out.splitlines()
    assert "ETA" in header and "running (kid 1m0" in line and "1m00s" in line  # 30 s training + 3 x 10 s
    assert "VAL (± STD OF THE MEAN)" in header and "KID 0.0606±0.16" in line  # the KID, its spread named
    assert main(["ls", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)[0]
    assert listed["phase"] == "kid" and listed["eta_s"] == pytest.approx(60.0)
    assert main(["show", "1"]) == 0
    out = capsys.readouterr().out
    assert "phase kid 1m0" in out and "ETA 1m00s (60 steps at 2/s + 3 evaluation(s), 10.0 s each)" in out


def test_fake_engine_names_its_phases_like_the_engine(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake engine (daemon and TUI tests) sends the engine's phases, each once as it begins: a
    TUI on it no longer shows "loading" for the whole run."""
    from daemon_helpers import config

    from dallm.config import config_from_dict
    from dallm.protocol import JobEvent, RollbackCommand
    from dallm.testing.fake_engine import train

    monkeypatch.setenv("DALLM_FAKE_STEP_S", "0")
    cfg = config_from_dict(
        config("phases", steps=12, every=6, eval={"every": 4}, samples={"every": 8, "prompts": ["a"]})
    )
    events: list[JobEvent] = []
    commands: list[RollbackCommand | None] = [None] * 10 + [RollbackCommand(step=6, resume=True)]
    train(cfg, out_dir=tmp_path, emit=events.append, poll=lambda: commands.pop(0) if commands else None)
    phases = [(e.phase, e.step) for e in events if isinstance(e, PhaseEvent)]
    assert phases == [
        ("training", 0),
        ("kid", 4),
        ("training", 4),
        ("checkpointing", 6),
        ("training", 6),
        ("kid", 8),
        ("sampling", 8),
        ("training", 8),
        # step 10: the rollback to 6; training goes on from there
        ("kid", 8),
        ("sampling", 8),
        ("training", 8),
        ("kid", 12),
        ("checkpointing", 12),
        ("stopping", 12),
    ]
    row = running()
    for e in events:
        row = row.apply(e)
    assert row.phase == "stopping"
