"""`metrics.jsonl`: one JSON object per logged step, flushed line by line.

On resume or rollback to step N the file is cut after N first, so no step ever appears twice.
Every checkpoint keeps a copy of the rows up to its step (`HISTORY` in its folder): a rollback that
finished at an earlier step cut them from the log, and a later resume from that checkpoint puts its
own history back instead of leaving a hole.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

HISTORY = "metrics.jsonl"  # a checkpoint folder's copy of the log up to its step


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line from a crash
    return rows


class MetricsLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run

    def truncate_after(self, step: int, checkpoint: Path | None = None) -> int:
        """Keep the history up to `step` only (no torn line), atomically: the log's own rows, or the
        rows saved in `checkpoint` when it has them (the lineage of its weights, which a rollback
        may have cut from the log). Returns how many of those rows the log lacked."""
        self._file.close()
        keep = _upto(read_metrics(self.path), step)
        saved = _upto(read_metrics(checkpoint / HISTORY), step) if checkpoint is not None else []
        restored = len({r["step"] for r in saved} - {r["step"] for r in keep})
        _write_rows(self.path, saved or keep)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        return restored

    def save_history(self, folder: Path, step: int) -> None:
        """Copy the rows up to `step` into a checkpoint folder (see the module's docstring)."""
        self._file.flush()
        _write_rows(folder / HISTORY, _upto(read_metrics(self.path), step))

    def write(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _upto(rows: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
    return [r for r in rows if int(r.get("step", 0)) <= step]


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
