"""`dallm train` end to end on the tiny model: config file, --set, --out, Ctrl-C and --resume."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from engine_helpers import losses

from dallm.cli import main


@pytest.fixture
def config(tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path) -> Path:
    image_dir(n=3, captions=True)
    path = tmp_path / "job.toml"
    path.write_text(
        f'name = "cli"\n[model]\nbase = "{tiny_sd}"\n[data]\ndir = "images"\n'
        '[train]\nsteps = 20\ndevice = "cpu"\n[monitor]\nwindow = 2\n[checkpoint]\nevery = 2\n'
    )
    return path


def test_train_end_to_end(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["train", str(config), "--set", "train.steps=4", "--out", str(out)]) == 0
    assert "completed: step 4, result = weights of step 4" in capsys.readouterr().out
    assert (out / "pytorch_lora_weights.safetensors").is_file() and len(losses(out)) == 4
    assert "steps = 4" in (out / "config.toml").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # an error from a --set value names the --set item, not the config file
        (["--set", "lora.rank=0"], "train: --set lora.rank=0: Input should be greater than or equal to 1"),
        (["--set", "train.lr"], "expected KEY=VALUE"),
        (["--set", "train.nope=1"], "--set train.nope=1: unknown key"),
        (["--set", "monitor.window=50"], "--set monitor.window=50: 50 is larger than train.steps (20)"),
        (["--set", "train.steps=1"], "--set train.steps=1: monitor.window: 2 is larger than train.steps (1)"),
        (["--set", "lora.rank=64"], "--set lora.rank=64: 64 is wider than the model's narrowest attention"),
        (["--set", "model.base=/nonexistent"], "--set model.base=/nonexistent: folder /nonexistent does not"),
        (["--resume", "/nonexistent"], "--resume: /nonexistent: no checkpoints found"),
    ],
)
def test_train_errors_are_one_line(
    config: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", str(config), *args]) == 1
    lines = capsys.readouterr().err.splitlines()
    # the error is one line, the last; before it at most the "torch threads: ..." note
    assert lines[-1].startswith("dallm train: ") and message in lines[-1] and "Traceback" not in lines
    assert all(line.startswith("torch threads: ") for line in lines[:-1]) and len(lines) <= 2


def test_ctrl_c_checkpoints_and_resumes(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dallm.image.trainer import ImageTrainer

    real_step = ImageTrainer.step

    def step(self: ImageTrainer, n: int) -> dict[str, float]:
        if n == 2:  # Ctrl-C while step 3 runs
            signal.raise_signal(signal.SIGINT)
        return real_step(self, n)

    monkeypatch.setattr(ImageTrainer, "step", step)
    out = tmp_path / "out"
    assert main(["train", str(config), "--set", "train.steps=6", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert (
        f"interrupted at step 3; resume with: dallm train {config} --set train.steps=6 --resume {out}" in err
    )
    assert (out / "checkpoints" / "step-000003" / "state.pt").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.setattr(ImageTrainer, "step", real_step)
    assert main(["train", str(config), "--set", "train.steps=6", "--resume", str(out)]) == 0
    assert len(losses(out)) == 6


def test_failing_text_encoder_job_is_one_line_and_a_log(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The engine failing inside (here: peft refusing the text encoder, as issue 10 saw with an
    incompatible peft) is one line on stderr naming the error and the file with the traceback."""
    import dallm.image.trainer
    from dallm.engine.lora import add_lora

    def refuse(unet: object, text_encoder: object, cfg: object) -> None:
        if getattr(cfg, "text_encoder", False):
            raise ValueError(
                "The version of PEFT you are using is not compatible, please use a version >= 0.22.0"
            )
        add_lora(unet, text_encoder, cfg)  # type: ignore[arg-type]

    monkeypatch.setattr(dallm.image.trainer, "add_lora", refuse)
    out = tmp_path / "te"
    assert (
        main(["train", str(config), "--set", "lora.text_encoder=true", "--out", str(out), "--no-progress"])
        == 1
    )
    err = capsys.readouterr().err
    log = out / "train-error.log"
    assert err == (
        "dallm train: failed: ValueError: The version of PEFT you are using is not compatible, please use "
        f"a version >= 0.22.0; traceback in {log}\n"
    )
    assert "Traceback" in log.read_text() and "refuse" in log.read_text()


def test_progress_lines_show_kid_with_its_spread() -> None:
    from dallm.cli.eventlines import EventLines
    from dallm.protocol import FinishedEvent, MetricsEvent

    lines = EventLines(100)
    _, text = lines(MetricsEvent(step=30, values={"loss": 0.5, "kid_val": 0.134, "kid_val_std": 0.041}))
    assert text.endswith("KID val 0.134 ± 0.041 (std of the mean)")
    done = FinishedEvent(
        reason="early_stop", final_step=90, result_step=60, result_kid_val=0.1, result_kid_val_std=0.02
    )
    assert lines(done)[1].endswith("result = weights of step 60, its KID val 0.1 ± 0.02 (std of the mean)")


def test_logs_say_which_checkpoints_are_gone() -> None:
    from dallm.cli.eventlines import EventLines
    from dallm.protocol import CheckpointsDeletedEvent

    line = EventLines(100)(CheckpointsDeletedEvent(steps=[100, 150], reason="checkpoint.keep = 2"))
    assert line == ("engine", "checkpoint(s) of step 100, 150 deleted (checkpoint.keep = 2)")
