"""`dallm micro build-llm` end to end at a tiny step count (so the build cannot rot), and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dallm.cli import main


def test_build_llm_end_to_end_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dallm.build_manifest import sha256

    out = tmp_path / "llm"
    assert main(["micro", "build-llm", "--out", str(out), "--steps", "3", "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest == json.loads((out / "MANIFEST.json").read_text())
    for rel, entry in manifest["files"].items():
        assert sha256(out / rel) == entry["sha256"]
    assert manifest["recipe"]["steps"] == 3 and manifest["threads"] == 1
    q = manifest["quality"]
    assert 0.0 <= q["grammatical_rate_base"] <= 1.0 and len(q["samples"]) == 8
    assert q["ppl_base_text"]["value"] > q["ppl_floor_base_text"] > 1.0
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert model.config.vocab_size == len(tok)
    # a rebuild into the same folder replaces the earlier build
    assert main(["micro", "build-llm", "--out", str(out), "--steps", "2"]) == 0
    assert json.loads((out / "MANIFEST.json").read_text())["recipe"]["steps"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threads", "0"], "--threads 0: must be at least 1"),
        (["--steps", "0"], "--steps 0: must be at least 1"),
    ],
)
def test_build_llm_refuses_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["micro", "build-llm", "--out", str(tmp_path / "x"), *args]) != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_build_llm_will_not_write_into_a_foreign_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    assert main(["micro", "build-llm", "--out", str(tmp_path), "--steps", "1"]) != 0
    assert "not a micro LLM build" in capsys.readouterr().err
    assert keep.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_llm_data_writes_the_three_sets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["micro", "llm-data", "--out", str(tmp_path), "--train", "5", "--val", "4", "--base", "3"]) == 0
    )
    lines = {n: (tmp_path / f"{n}.jsonl").read_text().splitlines() for n in ("train", "validation", "base")}
    assert [len(v) for v in lines.values()] == [5, 4, 3]
    assert main(["micro", "llm-data", "--out", str(tmp_path), "--val", "0"]) != 0
    assert "--val 0: must be at least 1" in capsys.readouterr().err
