"""What a job leaves in its output folder, defined once: `metrics.jsonl` lines, `result.json` and
`eval/summary.json`. The engine writes these models; the report, the sweep table and the daemon
(which refills metric steps it missed) read them back with the readers here.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dallm.protocol.events import FinishReason

METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
EVAL_SUMMARY_FILE = "eval/summary.json"


class MetricsFileError(ValueError):
    """A metrics.jsonl line that is not a metrics line; the message names the file and line."""


class _Scalars(BaseModel):
    """A model with named metrics as extra keys (a float, or null for a value that was not finite)."""

    model_config = ConfigDict(extra="allow")

    def scalars(self) -> dict[str, float]:
        """The extra keys whose values are finite numbers, as floats (others are left out)."""
        return {k: float(v) for k, v in (self.model_extra or {}).items() if _finite(v)}


_CHECKPOINT = re.compile(r"^step-(\d+)$")


def checkpoint_folders(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoints under `root` (a job's checkpoints/), oldest first, without
    importing torch (the daemon reads them too). The one definition of a complete checkpoint:
    engines write `.tmp-step-N` and rename it into place once complete, so every `step-N` folder
    is a whole checkpoint."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CHECKPOINT.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class MetricsLine(_Scalars):
    """One line of metrics.jsonl: {"step": N, "<metric>": value, ...}. Several lines may share a step
    (an evaluation logged apart); a step lower than an earlier one starts a new history there (a
    rollback or a resume that did not cut the file)."""

    step: int = Field(ge=0, strict=True)

    @classmethod
    def of(cls, step: int, values: dict[str, float]) -> MetricsLine:
        return cls(step=step, **{k: (v if math.isfinite(v) else None) for k, v in values.items()})


def metric_lines(path: Path) -> Iterator[tuple[str, MetricsLine]]:
    """(text, parsed line) for each line of `path`; none when it does not exist. A torn last line (a
    job still writing, or killed while writing) is left out; any other bad line: MetricsFileError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError) as e:
        raise MetricsFileError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    lines = text.split("\n")
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield line, MetricsLine.model_validate_json(line)
        except ValidationError as e:
            first = e.errors()[0]
            if first["type"] == "json_invalid":
                if n == len(lines):
                    return  # no newline after it: still being written
                why = first["msg"].removeprefix("Invalid JSON: ")
                raise MetricsFileError(f"{path}:{n}: not valid JSON ({why})") from None
            raise MetricsFileError(
                f'{path}:{n}: expected a JSON object with a non-negative integer "step"'
            ) from None


def read_metrics(path: Path) -> list[dict[str, float]]:
    """One merged row {"step": N, metric: value, ...} per step, in step order, of the history in
    force (a lower step than the last one drops the steps from there on); [] when there is none."""
    by_step: dict[int, dict[str, float]] = {}
    for _, line in metric_lines(path):
        if by_step and line.step < max(by_step):
            by_step = {s: r for s, r in by_step.items() if s < line.step}  # superseded history
        by_step.setdefault(line.step, {}).update(line.scalars())
    return [{"step": float(s), **by_step[s]} for s in sorted(by_step)]


def metric_lines_upto(path: Path, step: int) -> list[tuple[str, int]]:
    """(text, step) of the lines of steps up to `step`, as they were written (no torn last line)."""
    return [(text, line.step) for text, line in metric_lines(path) if line.step <= step]


def write_metric_lines(path: Path, lines: list[str]) -> None:
    """Replace `path` with `lines` atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(t + "\n" for t in lines), encoding="utf-8")
    os.replace(tmp, path)


class EvalSummary(_Scalars):
    """eval/summary.json and result.json's "eval": kid_* of the final step, turning_kid_* (KID of
    the turning point's weights), and the evaluation's cost (eval_count, eval_seconds_total, ...)."""

    final_step: int | None = None
    turning_point: int | None = None
    sample_count: str | None = None  # why the KID used eval_samples_num_images samples (eval.kid_std_target)


class SelectionInfo(BaseModel):
    """result.json's "selection" (monitor.select = "evidence"): `dallm.monitor.selection.Selection`."""

    model_config = ConfigDict(extra="forbid")

    signal: str  # which evidence chose the result (val KID with fidelity guard, val loss, ...)
    text: str  # the whole choice in one line (Selection.describe)
    reported_kid: float | None = None  # the result's validation KID, on the held-out half when below
    reported_on_held_out_half: bool = False
    runner_up: int | None = None
    margin: list[float] | None = None  # KID(result) - KID(runner-up), its 95% interval low, high
    paired: bool = False  # the margin is a paired difference (same references and noise)
    eligible: list[int] = Field(default_factory=list)  # steps within the fidelity margin of the base
    excluded: list[int] = Field(default_factory=list)  # steps the fidelity guard left out


class ResultFile(BaseModel):
    """result.json, written when a job ends: why, its last step, the step whose weights are the
    result, the turning point when one was found, and the final evaluation."""

    model_config = ConfigDict(extra="forbid")

    reason: FinishReason
    final_step: int
    result_step: int
    turning_point: int | None = None
    stop_step: int | None = None  # the step training stopped at (= final_step unless rolled back)
    seen_at: int | None = None  # the step at which the turning point was confirmed
    total_steps: int | None = None  # train.steps
    steps_saved: float | None = None  # 1 - stop_step / total_steps
    selected_by: str | None = None  # turning | best_val_kid | evidence | last: why result_step was chosen
    within_noise: list[int] = Field(default_factory=list)  # evaluated steps within one KID std of it
    selection: SelectionInfo | None = None  # selected_by = "evidence": the signal and the paired margin
    eval: dict[str, float | None] = Field(default_factory=dict)


def write_json(path: Path, model: BaseModel) -> None:
    """Atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(model.model_dump_json(indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_result(out_dir: Path) -> ResultFile | None:
    """`result.json` of a finished job; None for a running job or a file that is not one."""
    try:
        return ResultFile.model_validate_json((out_dir / RESULT_FILE).read_bytes())
    except (OSError, ValidationError):
        return None


def result_dict(out_dir: Path) -> dict[str, Any]:
    """`read_result` as a plain dict ({} when there is none), for tables that take any key."""
    result = read_result(out_dir)
    return json.loads(result.model_dump_json()) if result is not None else {}
