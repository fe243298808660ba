# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""The CLI's rough edges of issue 10: one-line errors that lose nothing, a closed pipe, jobs named
by id or name for `report` and `export` (the newest *finished* one), `logs -f` with the engine's
progress, `--help`, and the teacher refusing a prompt outside the micro world."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from daemon_helpers import config, daemons, home, wait_state  # noqa: F401
from safetensors.torch import save_file

from dallm.cli import build_parser, main


def _one_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"dallm {command}: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_bad_arguments_are_one_line_and_lose_nothing(
    daemons, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = daemons()
    base = ["--home", str(home)]
    with d.client() as c:
        job = c.submit(config("qs", steps=5, every=5))
        before = wait_state(c, job.id, "finished")
        assert main(["rollback", "1", "--step", "-5", *base]) == 2
        assert _one_line(capsys, "rollback") == (
            "dallm rollback: --step -5: a step is 0 or more (`dallm show 1` lists checkpoints)"
        )
        assert main(["ls", "--state", "bogus", *base]) == 2
        assert "--state bogus: no such state; use one of queued, running, stopping" in _one_line(capsys, "ls")
        assert main(["ls", "--limit", "0", *base]) == 2
        assert _one_line(capsys, "ls") == "dallm ls: --limit 0: give 1 or more"
        # a value only the protocol's request model refuses: still one line naming the field
        job_toml = tmp_path / "job.toml"
        job_toml.write_text(f'[data]\ndir = "{c.show(1).config["data"]["dir"]}"\ninstance_prompt = "x"\n'
                            "[train]\nsteps = 5\n[monitor]\nwindow = 2\n")  # fmt: skip
        assert main(["submit", str(job_toml), "--retries", "-1", *base]) == 2
        assert (
            _one_line(capsys, "submit") == "dallm submit: retries: Input should be greater than or equal to 0"
        )
        after = c.summary(1)
        assert (after.state, after.step, after.result_step) == (before.state, before.step, before.result_step)
        assert len(c.jobs()) == 1  # nothing queued, nothing lost

    # `dallm ls | head -2`: the reader leaves before dallm writes; dallm ends quietly like a unix tool
    proc = subprocess.Popen([sys.executable, "-m", "dallm", "ls", *base], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141 and err == ""


def test_report_and_export_take_a_job_id_or_name(
    daemons, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = daemons()
    base = ["--home", str(home)]
    with d.client() as c:
        done = c.submit(config("qs", steps=5, every=5))
        wait_state(c, done.id, "finished")
        newer = c.submit(config("qs", steps=100_000, every=1000))
        c.cancel(newer.id)
        wait_state(c, newer.id, "cancelled")
    folder = Path(done.out_dir)
    assert main(["report", "1", *base]) == 0  # a job id, like `dallm export 1`
    assert str(folder / "report" / "loss.png") in capsys.readouterr().out
    assert main(["report", "qs", "--out", str(tmp_path / "plots"), *base]) == 0
    out, err = capsys.readouterr()
    assert err == "qs: job 1 (finished), the newest finished; newer: job 2 cancelled\n"
    assert str(tmp_path / "plots" / "loss.png") in out
    # export by name: the finished job's weights, not the cancelled newer job's (it has none)
    save_file({"unet.a.to_q.lora_A.weight": torch.ones(2, 4), "unet.a.to_q.lora_B.weight": torch.ones(4, 2)},
              str(folder / "pytorch_lora_weights.safetensors"))  # fmt: skip
    assert main(["export", "qs", "--format", "kohya", "--out", str(tmp_path / "qs.safetensors"), *base]) == 0
    assert "the newest finished" in capsys.readouterr().err and (tmp_path / "qs.safetensors").is_file()
    assert main(["report", "nope", *base]) == 1
    assert _one_line(capsys, "report") == "dallm report: nope: not a folder, and no job 'nope'"
    assert main(["report", str(tmp_path / "no" / "such"), *base]) == 1
    assert _one_line(capsys, "report").endswith("no such job folder")
    # export errors that say what to do: the cancelled job has no result, an LLM job's is --format peft
    out = ["--out", str(tmp_path / "x.safetensors"), *base]
    assert main(["export", "2", "--format", "kohya", *out]) == 1
    assert _one_line(capsys, "export").startswith("dallm export: job 2 (qs) is cancelled: it has no result; ")
    llm = tmp_path / "llm-job"
    llm.mkdir()
    (llm / "adapter_config.json").write_text("{}")
    (llm / "adapter_model.safetensors").write_bytes(b"")
    assert main(["export", str(llm), "--format", "kohya", *out]) == 1
    assert _one_line(capsys, "export").endswith(
        "is an LLM job: its result is a peft adapter; use --format peft"
    )
    with pytest.raises(SystemExit) as exit_:  # argparse's errors: one line too, not the usage block
        main(["export", "3", "--format", "bogus", *out])
    assert exit_.value.code == 2
    assert _one_line(capsys, "export").startswith("dallm export: argument --format: invalid choice: 'bogus'")


def test_logs_follow_shows_the_engines_progress(
    daemons, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = daemons(step_s=0.05)
    with d.client() as c:
        job = c.submit(config("follow", steps=40, every=10))
    assert main(["logs", str(job.id), "-f", "--home", str(home)]) == 0  # returns when the job ends
    out = capsys.readouterr().out
    assert " progress step 40/40  loss " in out
    assert " engine  checkpoint of step 40: checkpoints/step-000040" in out
    assert " engine  done (completed) at step 40; result = weights of step 40" in out
    assert out.rstrip().endswith("finished: completed 40 steps")
    progress = [line for line in out.splitlines() if " progress " in line]
    assert 1 <= len(progress) <= 10  # every 10% of the steps, not every step


def test_help_ends_in_full_sentences(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert parser.description is not None and parser.description.endswith(".")
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.rstrip().endswith("README.md has examples.")


def test_teacher_refuses_a_prompt_outside_the_world(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "targets"
    assert (
        main(["synth", "--model", "teacher", "--prompt", "a purple hexagon", "-n", "2", "--out", str(out)])
        == 1
    )
    assert _one_line(capsys, "synth") == (
        "dallm synth: --prompt 'a purple hexagon': the teacher does not know 'purple', 'hexagon'; its words: "
        "a, on, in, background, style, circle, square, triangle, red, green, blue, yellow, white, black, "
        "plain, baroque"
    )
    assert not out.exists()  # nothing written
    assert main(["synth", "--model", "teacher", "--prompt", "a red circle in baroque style", "-n", "2",
                 "--out", str(out)]) == 0  # fmt: skip
    assert len(list(out.glob("*.png"))) == 2
