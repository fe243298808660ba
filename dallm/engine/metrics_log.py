"""`metrics.jsonl`: one JSON object per logged step (`dallm.protocol.files.MetricsLine`), flushed
line by line.

On resume or rollback to step N the file is cut after N first, so no step ever appears twice.
Every checkpoint keeps a copy of the rows up to its step (`HISTORY` in its folder): a rollback that
finished at an earlier step cut them from the log, and a later resume from that checkpoint puts its
own history back instead of leaving a hole.
"""

from __future__ import annotations

from pathlib import Path

from dallm.protocol.files import MetricsLine, metric_lines_upto, write_metric_lines

HISTORY = "metrics.jsonl"  # a checkpoint folder's copy of the log up to its step


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
        keep = metric_lines_upto(self.path, step)
        saved = metric_lines_upto(checkpoint / HISTORY, step) if checkpoint is not None else []
        restored = len({s for _, s in saved} - {s for _, s in keep})
        write_metric_lines(self.path, [text for text, _ in (saved or keep)])
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        return restored

    def save_history(self, folder: Path, step: int) -> None:
        """Copy the rows up to `step` into a checkpoint folder (see the module's docstring)."""
        self._file.flush()
        write_metric_lines(folder / HISTORY, [text for text, _ in metric_lines_upto(self.path, step)])

    def write(self, step: int, values: dict[str, float]) -> None:
        self._file.write(MetricsLine.of(step, values).model_dump_json() + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
