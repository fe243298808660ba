"""What the machine the daemon runs on is doing: host CPU and memory, each GPU, each running job.

The daemon samples these (it runs on the GPU box; a TUI may be remote) and answers a
`ResourcesRequest` with a `ResourcesReply`. A worker reports its job's peak memory itself
(`UsageEvent`, dallm.protocol.events): the daemon keeps the peak in the job's row.
"""

from __future__ import annotations

from dallm.protocol.events import Message


class HostUsage(Message):
    cpu_percent: float  # all cores together, 0..100
    cpu_count: int
    mem_used_mb: float
    mem_total_mb: float


class GpuUsage(Message):
    index: int
    name: str
    util_percent: float | None  # None: the driver does not say (some virtualised GPUs)
    mem_used_mb: float
    mem_total_mb: float


class JobUsage(Message):
    """A running job's worker process, as sampled now."""

    job: int
    pid: int
    device: str
    cpu_percent: float  # of one core (200 = two cores busy)
    rss_mb: float
    gpu_mem_mb: float | None = None  # what NVML says the process holds on its GPU; None without NVML
