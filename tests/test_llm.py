"""LLM jobs without the daemon: config and data errors (one line, naming the key and file), the
foreground loop (perplexities improve, text samples, exact resume), the report and the TUI's
perplexity chart and text pane."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dallm.config import ConfigError, config_from_dict, load_config
from dallm.llm.data import load_texts, read_texts
from dallm.micro_llm.data import text_sets, write_text_sets
from dallm.protocol import EventEnvelope, InterruptCommand, MetricsEvent, SampleEvent, StartedEvent, job_topic

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def texts(tmp_path: Path) -> dict[str, Path]:
    return write_text_sets(tmp_path / "texts", text_sets(n_train=12, n_val=12, n_base=12, seed=0))


def llm_dict(texts: dict[str, Path], **sections: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model": {"kind": "llm", "base": "micro-llm"},
        "data": {k: str(v) for k, v in texts.items()},
        "lora": {"rank": 4},
        "train": {"steps": 12, "batch_size": 4, "lr": 1e-2, "device": "cpu"},
        "monitor": {"window": 2, "early_stop": "off"},
        "checkpoint": {"every": 6, "keep": None},
        "eval": {"every": 6},
        "samples": {"every": 6, "prompts": ["there is a"], "max_new_tokens": 6},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


# -- config and data ------------------------------------------------------------------------------


def test_shipped_llm_configs_load() -> None:
    quick = load_config(ROOT / "configs" / "llm-quickstart.toml")
    assert quick.model.kind == "llm" and quick.lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert all(p.is_file() for p in quick.data.train + quick.data.validation + quick.data.base)
    real = load_config(ROOT / "configs" / "llm-real-small.toml")
    assert real.model.base == "Qwen/Qwen2.5-0.5B" and "down_proj" in real.lora.targets  # lora.mlp


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": {"train": []}}, "data.train: required"),
        ({"data": {"dir": "/tmp"}}, "data.dir: an image setting"),
        ({"tokens": {"new": ["<s1>"]}}, "tokens.new: an image setting"),
        ({"train": {"method": "full"}}, "train.method: model.kind"),
        ({"train": {"compile": True}}, "train.compile: an image setting"),
        ({"train": {"channels_last": True}}, "train.channels_last: an image setting"),
        ({"model": {"quantize": "4bit"}}, "model.quantize"),
        ({"model": {"kind": "text"}}, "model.kind"),
        ({"data": {"val_fraction": 1.5}}, "data.val_fraction"),
        ({"lora": {"mlpp": True}}, "lora.mlpp: unknown key"),
    ],
)
def test_bad_llm_config_is_one_line_naming_the_key(texts, change, message) -> None:
    cfg = llm_dict(texts)
    for key, value in change.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    with pytest.raises(ConfigError) as e:
        config_from_dict(cfg, "job.toml")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_text_files_in_an_image_job_are_refused(texts) -> None:
    with pytest.raises(ConfigError, match="data.train: text files are for"):
        config_from_dict({"data": {"dir": "/tmp", "train": [str(texts["train"])]}})


def test_read_texts_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"data.train: .*bad.jsonl line 2: not JSON"):
        read_texts(bad, "data.train")
    bad.write_text('{"text": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(ConfigError, match=r"line 2: no non-empty string field 'text'"):
        read_texts(bad, "data.train")
    with pytest.raises(ConfigError, match="data.base: no such file"):
        read_texts(tmp_path / "missing.txt", "data.base")
    txt = tmp_path / "t.txt"
    txt.write_text("one text\n\n two \n")
    assert read_texts(txt, "data.train") == ["one text", "two"]


def test_val_fraction_holds_out_a_seeded_part(texts) -> None:
    cfg = config_from_dict(llm_dict(texts, data={"validation": [], "val_fraction": 0.25}))
    got = load_texts(cfg.data, seed=0)
    assert len(got.validation) == 3 and len(got.train) == 9
    assert not set(got.validation) & set(got.train)
    assert load_texts(cfg.data, seed=0) == got


def test_cli_errors_are_one_line(tmp_path: Path, texts, capsys) -> None:
    from dallm.cli import main

    (tmp_path / "bad.jsonl").write_text("{oops\n")
    cfg = tmp_path / "job.toml"
    cfg.write_text(
        '[model]\nkind = "llm"\nbase = "micro-llm"\n[data]\ntrain = "bad.jsonl"\n[train]\ndevice = "cpu"\n'
    )
    assert main(["train", str(cfg)]) != 0
    err = capsys.readouterr().err.strip()
    assert "data.train" in err and "bad.jsonl line 1: not JSON" in err and len(err.splitlines()) == 1
    (tmp_path / "bad.jsonl").write_text('{"text": "there is a red circle."}\n')
    assert main(["train", str(cfg), "--set", "model.base=./nowhere"]) != 0
    err = capsys.readouterr().err.strip()
    assert "model.base" in err and len(err.splitlines()) == 1


def test_4bit_without_bitsandbytes_is_one_line(texts) -> None:
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    from dallm.preflight import preflight

    cfg = config_from_dict(llm_dict(texts, model={"quantize": "4bit"}, train={"device": "auto"}))
    with pytest.raises(ConfigError, match="model.quantize: .*bitsandbytes"):
        preflight(cfg)


# -- the loop -------------------------------------------------------------------------------------


def test_llm_job_in_the_foreground_resumes_exactly(tmp_path: Path, texts) -> None:
    """Perplexities improve on the base, samples are text, and an interrupted run resumed from its
    checkpoint ends with the same adapter bytes as an uninterrupted one."""
    from dallm.engine.dispatch import train
    from dallm.report.job import write_report

    cfg = config_from_dict(llm_dict(texts))
    events: list = []
    whole = train(cfg, out_dir=tmp_path / "whole", emit=events.append)
    assert whole.reason == "completed" and whole.result_step == 12
    (started,) = [e for e in events if isinstance(e, StartedEvent)]
    assert (started.job_kind, started.validation_measure) == ("llm", "ppl_val")
    ppl = [e.values for e in events if isinstance(e, MetricsEvent) and "ppl_val" in e.values]
    assert len(ppl) == 2 and ppl[0]["ppl_val"] < ppl[0]["base_ppl_val"]
    assert ppl[1]["ppl_val"] < ppl[0]["ppl_val"] and ppl[1]["ppl_val"] < ppl[1]["base_ppl_val"] / 10
    assert all(k in ppl[1] for k in ("ppl_train_std", "ppl_base", "ppl_base_std", "base_ppl_base"))
    samples = [e for e in events if isinstance(e, SampleEvent)]
    assert [s.step for s in samples] == [6, 12] and samples[0].texts[0].startswith("there is a")
    assert (tmp_path / "whole" / samples[0].path).read_text().startswith("there is a")

    commands = iter([None] * 6 + [InterruptCommand()])
    cut = train(cfg, out_dir=tmp_path / "cut", poll=lambda: next(commands, None))
    assert cut.reason == "interrupted" and cut.final_step == 6
    resumed = train(cfg, resume=tmp_path / "cut")
    assert resumed.result_step == 12
    name = "adapter_model.safetensors"
    assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    adapter = json.loads((tmp_path / "whole" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]

    plots = write_report(tmp_path / "whole")
    assert Path(plots["ppl"]).is_file() and "kid" not in plots


# -- TUI ------------------------------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_tui_labels_perplexity_and_shows_text_samples() -> None:
    from textual.app import App, ComposeResult
    from textual.widgets import Static

    from dallm.tui.chart_panel import Charts
    from dallm.tui.model import HistoryView, JobData
    from dallm.tui.thumbnail import SampleGrid, Thumbnail

    data = JobData(1)
    events = [
        MetricsEvent(step=5, values={"loss": 2.0, "ppl_val": 500.0, "ppl_val_std": 3.0, "ppl_train": 480.0}),
        MetricsEvent(step=10, values={"loss": 1.0, "ppl_val": 5.0, "ppl_val_std": 0.1, "ppl_train": 4.0}),
        SampleEvent(
            step=10, path="samples/step-000010.txt", prompts=["there is a"], texts=["there is a red circle."]
        ),
    ]
    for seq, ev in enumerate(events, start=1):
        data.apply(EventEnvelope(seq=seq, topic=job_topic(1), job=1, t=0.0, event=ev))

    class Host(App):
        def compose(self) -> ComposeResult:
            yield Charts()
            yield Thumbnail()

    app = Host()
    async with app.run_test(size=(80, 30)) as pilot:
        history = HistoryView(data, 1, data.version, kind="llm")  # the kind comes with the job's row
        app.query_one(Charts).history = history
        thumb = app.query_one(Thumbnail)
        thumb.history = history
        await pilot.pause()
        bottom = app.query_one("#chart-bottom")
        assert bottom.title == "perplexity"
        assert bottom.log_y  # perplexity falls by decades: a log axis by default
        note = thumb.query_one(SampleGrid).query_one(Static)
        assert "there is a red circle." in str(note.content)
