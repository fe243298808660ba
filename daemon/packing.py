"""Several jobs on one GPU (`--devices 0x2`: two slots on GPU 0): a job joins a busy GPU only when
its peak memory, with the peaks of the jobs already there, fits in the GPU's memory.

A job's peak is measured by its worker (torch's peak reserved memory, written to
<out>/peak-memory.json when it ends) and recorded in the store (table peak_memory) under the job's
shape: the config fields that set memory use (model, resolution, batch size, LoRA rank, precision,
gradient checkpointing). A job whose shape has no record yet, or a GPU whose size is unknown
(nvidia-ml-py absent, no NVML), is not packed: it waits for a GPU of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from dallm.jobfiles import UnsafeJobFolder, read_fd

log = logging.getLogger("dallm.daemon")

PEAK_FILE = "peak-memory.json"
# Each process's CUDA context (and the allocator's slack) on top of torch's reserved peak.
CONTEXT_BYTES = 768 * 2**20
GIB = 2**30


def shape_key(config: dict) -> str:
    """The fields of a job config that decide its GPU memory, as a short stable key."""
    model, train, lora = (config.get(k) or {} for k in ("model", "train", "lora"))
    fields = {
        "base": model.get("base"),
        "resolution": model.get("resolution"),
        "batch_size": train.get("batch_size"),
        "mixed_precision": train.get("mixed_precision"),
        "gradient_checkpointing": train.get("gradient_checkpointing"),
        "rank": lora.get("rank"),
        "text_encoder_rank": lora.get("text_encoder_rank"),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def device_memory(index: str) -> int | None:
    """Total memory of CUDA device `index` in bytes (NVML), None when it cannot be read."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(int(index))).total)
        finally:
            pynvml.nvmlShutdown()
    except (pynvml.NVMLError, ValueError):
        return None


def fits(need: int | None, others: list[int | None], total: int | None) -> tuple[bool, str]:
    """May a job needing `need` bytes join a GPU of `total` bytes where jobs needing `others` run?
    (True, "") or (False, why). An idle GPU always takes the job (it is its own, as without packing)."""
    if not others:
        return True, ""
    if total is None:
        return False, "GPU memory unknown (nvidia-ml-py absent or NVML unavailable), not packing"
    if need is None:
        return False, "its peak memory is unknown until a job of its shape has run once, not packing"
    if any(o is None for o in others):
        return False, "a running job's peak memory is unknown, not packing"
    used = sum(o + CONTEXT_BYTES for o in others if o is not None)
    want = need + CONTEXT_BYTES
    if used + want > total:
        return False, (f"needs {want / GIB:.1f} GiB, running jobs {used / GIB:.1f} GiB, "
                       f"GPU {total / GIB:.1f} GiB: does not fit")  # fmt: skip
    return True, f"packed: {(used + want) / GIB:.1f} of {total / GIB:.1f} GiB"


def read_peak(out: Path) -> int | None:
    """The peak a worker wrote in its output folder, None when absent or unreadable."""
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError, UnsafeJobFolder):
        with os.fdopen(read_fd(out, PEAK_FILE), "rb") as f:  # no planted link followed
            value = json.loads(f.read(4096)).get("bytes")
        if isinstance(value, int) and value > 0:
            return value
    return None


def write_peak(out: Path) -> None:
    """In the worker, after the engine ran: torch's peak reserved CUDA memory, when CUDA was used."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    peak = int(torch.cuda.max_memory_reserved())
    if peak > 0:
        with contextlib.suppress(OSError):
            (out / PEAK_FILE).write_text(json.dumps({"bytes": peak, "device": torch.cuda.get_device_name()}))


class PeakBook:
    """Recorded peaks by shape, in the daemon's store (its own table and connection)."""

    def __init__(self, db: Path | str) -> None:
        self.db = sqlite3.connect(str(db), timeout=5.0, isolation_level=None, check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS peak_memory (shape TEXT PRIMARY KEY, bytes INTEGER "
                        "NOT NULL, job INTEGER, t REAL)")  # fmt: skip

    def get(self, shape: str) -> int | None:
        row = self.db.execute("SELECT bytes FROM peak_memory WHERE shape = ?", (shape,)).fetchone()
        return int(row[0]) if row else None

    def record(self, shape: str, peak: int, job: int) -> None:
        """The largest peak seen for the shape (a resumed run may peak lower than a full one)."""
        with contextlib.suppress(sqlite3.Error):
            self.db.execute(
                "INSERT INTO peak_memory VALUES (?, ?, ?, ?) ON CONFLICT(shape) DO UPDATE SET "
                "bytes = max(bytes, excluded.bytes), job = excluded.job, t = excluded.t",
                (shape, peak, job, time.time()),
            )

    def close(self) -> None:
        self.db.close()


MemoryOf = Callable[[str], int | None]
