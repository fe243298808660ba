"""How many threads torch's intra-op pool gets in a training process.

On a CPU that other work keeps busy, a parallel op waits for its slowest thread, and a thread whose
core is taken waits a whole scheduler slice: a worker ran at 0.07-0.13 steps/s with every core's
thread and 3.3 steps/s with one (30x). So a process takes its slot's share of the cores, and fewer
when other work is using some right now (psutil's CPU use over a short sample, taken before this
process starts working; the load average lags by a minute and would still count a job that just
ended). `DALLM_THREADS` (or `OMP_NUM_THREADS`) set by the user wins.
"""

from __future__ import annotations

import os
import sys

THREADS_ENV = "DALLM_THREADS"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask; a container's cpuset is honoured)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def choose_threads(slot_cores: int, cores: int, busy: float) -> int:
    """The slot's cores, or the idle cores when fewer (`busy`: cores' worth of use by others); >= 1."""
    idle = int(cores - busy + 0.5)
    return max(1, min(slot_cores, idle))


def busy_cores(sample_s: float = 0.25) -> float:
    """Cores' worth of CPU in use on this machine over `sample_s` (this process idles meanwhile)."""
    import psutil

    return sum(psutil.cpu_percent(interval=sample_s, percpu=True)) / 100.0


def explicit_threads(env: dict[str, str] | os._Environ[str] = os.environ) -> int | None:
    """A thread count the user set (DALLM_THREADS, else OMP_NUM_THREADS); None when unset."""
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = env.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{name}={value!r}: use a whole number of threads >= 1")
            return int(value)
    return None


def set_torch_threads(slot_cores: int | None = None) -> str:
    """Size torch's pool for this process; returns one line saying what was chosen and why."""
    explicit = explicit_threads()
    if explicit is not None:
        n, why = explicit, "set by the environment"
    else:
        cores = usable_cores()
        slot = max(1, min(slot_cores or cores, cores))
        busy = busy_cores()
        n = choose_threads(slot, cores, busy)
        why = f"slot of {slot} of {cores} cores, {busy:.1f} cores busy with other work"
    # Through the environment when torch is not loaded yet: a worker whose engine never needs torch
    # (or loads it later) does not pay for importing it here; torch reads it when it starts.
    os.environ["OMP_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return f"torch threads: {n} ({why})"
