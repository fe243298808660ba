"""`metrics.jsonl`: one JSON object per logged step (`dallm.protocol.files.MetricsLine`), flushed
line by line.

On resume or rollback to step N the file is cut after N first, so no step ever appears twice.
"""

from __future__ import annotations

from pathlib import Path

from dallm.protocol.files import MetricsLine, truncate_metrics


class MetricsLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run

    def truncate_after(self, step: int) -> None:
        """Drop the lines of steps after `step` (and any torn line), atomically."""
        self._file.close()
        truncate_metrics(self.path, step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, step: int, values: dict[str, float]) -> None:
        self._file.write(MetricsLine.of(step, values).model_dump_json() + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
