"""Several jobs on one GPU: the packing decision (daemon/packing.py, Scheduler.slot_for) with fake
memory figures, `--devices 0x2`, and the peak a worker records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dallm.daemon.executors.local import detect_devices
from dallm.daemon.packing import CONTEXT_BYTES, GIB, PeakBook, fits, read_peak, shape_key
from dallm.daemon.scheduler import Scheduler, WorkerProc


def test_devices_slots_per_gpu() -> None:
    assert detect_devices("0x2,1") == ["0", "0", "1"]
    assert detect_devices("cpu") == ["cpu"]
    for bad in ("0x0", "0x", "gpu0", "0x2x2", "x2"):
        with pytest.raises(ValueError, match="--devices"):
            detect_devices(bad)


def test_fits_decision() -> None:
    total = 80 * GIB
    assert fits(None, [], None) == (True, "")  # an idle GPU takes any job, as without packing
    ok, why = fits(10 * GIB, [20 * GIB], total)
    assert ok and "packed" in why
    ok, why = fits(50 * GIB, [30 * GIB], total)
    assert not ok and "does not fit" in why
    # The CUDA context of each process counts: two jobs just under half the GPU do not fit.
    half = total // 2 - CONTEXT_BYTES // 2
    assert not fits(half, [half], total)[0]
    assert fits(half - CONTEXT_BYTES, [half - CONTEXT_BYTES], total)[0]
    assert fits(10 * GIB, [10 * GIB], None) == (
        False, "GPU memory unknown (nvidia-ml-py absent or NVML unavailable), not packing")  # fmt: skip
    assert not fits(None, [10 * GIB], total)[0]
    assert not fits(10 * GIB, [None], total)[0]


class FakeHandle:
    pid = None
    returncode = None
    lost = None
    error = None

    def poll(self) -> None:
        return None

    def signal(self, sig: int) -> None:
        pass


def sched_with(tmp_path: Path, memory: int | None, peaks: dict[str, int]) -> Scheduler:
    book = PeakBook(tmp_path / "db.sqlite")
    for shape, peak in peaks.items():
        book.record(shape, peak, 1)
    return Scheduler(["0", "0"], "ipc://unused", None, peaks=book, memory=lambda index: memory)


def occupy(s: Scheduler, slot: int, need: int | None) -> None:
    s.slots[slot] = WorkerProc(9, 1, slot, "cuda:0", FakeHandle(), b"9.1", need=need)


def test_slot_for_packs_only_what_fits(tmp_path: Path) -> None:
    small, big = {"model": {"resolution": 64}}, {"model": {"resolution": 1024}}
    s = sched_with(tmp_path, 80 * GIB, {shape_key(small): 8 * GIB, shape_key(big): 75 * GIB})
    assert s.slot_for(1, big) == 0  # the GPU is idle
    occupy(s, 0, 8 * GIB)
    assert s.slot_for(2, small) == 1
    assert s.slot_for(3, big) is None and "does not fit" in s.refused[3]
    assert s.slot_for(4, {"model": {"resolution": 512}}) is None and "unknown" in s.refused[4]
    s.slots[0] = None
    assert s.slot_for(3, big) == 0


def test_slot_for_unknown_gpu_memory_does_not_pack(tmp_path: Path) -> None:
    cfg = {"model": {"resolution": 64}}
    s = sched_with(tmp_path, None, {shape_key(cfg): GIB})
    occupy(s, 0, GIB)
    assert s.slot_for(2, cfg) is None
    assert s.refused[2].startswith("GPU memory unknown")


def test_peak_recorded_as_the_largest(tmp_path: Path) -> None:
    book = PeakBook(tmp_path / "db.sqlite")
    book.record("a", 5, 1)
    book.record("a", 3, 2)
    assert book.get("a") == 5 and book.get("b") is None
    (tmp_path / "peak-memory.json").write_text(json.dumps({"bytes": 123}))
    assert read_peak(tmp_path) == 123
    (tmp_path / "peak-memory.json").write_text("not json")
    assert read_peak(tmp_path) is None


def test_shape_key_ignores_what_does_not_change_memory() -> None:
    a = {"name": "a", "model": {"resolution": 512}, "train": {"steps": 10, "batch_size": 2}}
    b = {"name": "b", "model": {"resolution": 512}, "train": {"steps": 99, "batch_size": 2}}
    assert shape_key(a) == shape_key(b)
    assert shape_key(a) != shape_key({**a, "train": {"batch_size": 4}})
