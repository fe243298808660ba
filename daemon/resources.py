"""Sampling the daemon's machine for `ResourcesRequest`: host CPU/memory (psutil), each GPU and the
GPU memory of each worker process (NVML through nvidia-ml-py), each running job's worker.

NVML is optional: without the library or a driver (a CPU-only machine) the reply lists no GPU and
says why in `gpu_note`; nothing else changes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

from dallm.protocol import GpuUsage, HostUsage, JobUsage, ResourcesReply

MB = 2**20


@dataclass(frozen=True)
class RunningWorker:
    job: int
    pid: int
    device: str


class ResourceSampler:
    """Holds what a sample needs between calls: psutil's CPU counters (a percentage is since the
    previous call) and the NVML session, opened once."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        self._nvml = None
        self.gpu_note = ""
        self._open_nvml()
        psutil.cpu_percent(None)  # start the host counter: the first answer is then a real one

    def _open_nvml(self) -> None:
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
        except ImportError:
            self.gpu_note = "no GPU: nvidia-ml-py is not installed"
        except Exception as e:  # pynvml.NVMLError: no driver, no library, no device
            self.gpu_note = f"no GPU: NVML not available ({e})"
        else:
            self._nvml = pynvml

    def sample(self, workers: Iterable[RunningWorker]) -> ResourcesReply:
        vm = psutil.virtual_memory()
        host = HostUsage(
            cpu_percent=psutil.cpu_percent(None),
            cpu_count=psutil.cpu_count() or 1,
            mem_used_mb=round((vm.total - vm.available) / MB, 1),
            mem_total_mb=round(vm.total / MB, 1),
        )
        gpus, gpu_mem = self._gpus()
        jobs = []
        alive = set()
        for w in workers:
            proc = self._process(w.pid)
            if proc is None:
                continue
            alive.add(w.pid)
            try:
                with proc.oneshot():
                    cpu, rss = proc.cpu_percent(None), proc.memory_info().rss
            except psutil.Error:  # the worker exited between the listing and now
                continue
            jobs.append(
                JobUsage(
                    job=w.job,
                    pid=w.pid,
                    device=w.device,
                    cpu_percent=round(cpu, 1),
                    rss_mb=round(rss / MB, 1),
                    gpu_mem_mb=gpu_mem.get(w.pid) if self._nvml is not None else None,
                )
            )
        for pid in set(self._procs) - alive:
            del self._procs[pid]
        return ResourcesReply(t=time.time(), host=host, gpus=gpus, gpu_note=self.gpu_note, jobs=jobs)

    def _process(self, pid: int) -> psutil.Process | None:
        proc = self._procs.get(pid)
        if proc is None:
            try:
                proc = self._procs[pid] = psutil.Process(pid)
                proc.cpu_percent(None)  # starts its counter: 0.0 the first time
            except psutil.Error:
                return None
        return proc

    def _gpus(self) -> tuple[list[GpuUsage], dict[int, float]]:
        nv = self._nvml
        if nv is None:
            return [], {}
        gpus: list[GpuUsage] = []
        per_pid: dict[int, float] = {}
        self.gpu_note = ""
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                try:
                    util: float | None = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
                except nv.NVMLError:
                    util = None
                name = nv.nvmlDeviceGetName(h)
                gpus.append(
                    GpuUsage(
                        index=i,
                        name=name.decode() if isinstance(name, bytes) else str(name),
                        util_percent=util,
                        mem_used_mb=round(mem.used / MB, 1),
                        mem_total_mb=round(mem.total / MB, 1),
                    )
                )
                for p in nv.nvmlDeviceGetComputeRunningProcesses(h):
                    if p.usedGpuMemory is not None:
                        per_pid[p.pid] = per_pid.get(p.pid, 0.0) + round(p.usedGpuMemory / MB, 1)
        except nv.NVMLError as e:  # a GPU fell off the bus, the driver was reloaded...
            self.gpu_note = f"GPU query failed: {e}"
        return gpus, per_pid
