"""Sweeps: a config x a grid of overrides x K seeds, as one group of jobs.

`plan_sweep` expands `--grid lora.rank=1,4,16 --grid data.limit=5,10` and `--repeat K` into runs
(seed = cfg.seed + k), each a validated `JobConfig` named `<name>-r4-n10-s0`; every grid value is
checked (schema and folders) before anything runs or is queued. A sweep lives in one folder:

    <sweep folder>/sweep.json          the manifest: id, config, grid, runs (name, params, seed, job)
    <sweep folder>/<run name>/...      each run's output folder (metrics.jsonl, result.json, ...)

`--local` runs put the folder at `runs/<sweep id>`; daemon sweeps at `<home>/jobs/<sweep id>` (the
jobs' `output_dir` is `<sweep id>/<run name>`, relative to the daemon's jobs folder), so
`dallm report --sweep` reads both the same way and `dallm ls` groups jobs by their folder's manifest.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dallm.config import ConfigError, JobConfig, load_config, parse_override
from dallm.preflight import checked_config

MANIFEST = "sweep.json"
# Short labels for run names; other keys use their last part.
LABELS = {
    "lora.rank": "r",
    "data.limit": "n",
    "train.lr": "lr",
    "train.steps": "t",
    "train.method": "",
    "lora.alpha": "a",
    "train.batch_size": "b",
}


@dataclass
class Axis:
    key: str
    raw: list[str]  # the values as typed (passed on as --set KEY=RAW)
    values: list[Any]  # parsed (TOML)

    @property
    def label(self) -> str:
        return LABELS.get(self.key, self.key.rsplit(".", 1)[-1])


@dataclass
class Run:
    name: str
    params: dict[str, Any]  # grid key -> value
    repeat: int
    seed: int
    overrides: list[str]
    dir: str  # relative to the sweep folder
    job: int | None = None
    state: str = "planned"  # planned | done | failed | submitted (daemon)
    seconds: float | None = None
    error: str | None = None


@dataclass
class Sweep:
    id: str
    config: str
    sets: list[str]
    grid: list[dict[str, Any]]
    repeat: int
    mode: str  # local | daemon
    created: float = field(default_factory=time.time)
    runs: list[Run] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Sweep:
        runs = [Run(**r) for r in data.get("runs", [])]
        return cls(**{k: v for k, v in data.items() if k != "runs"}, runs=runs)


def parse_grid(items: list[str]) -> list[Axis]:
    """`["lora.rank=1,4,16", ...]` -> axes; a repeated key or an empty value is an error."""
    axes: list[Axis] = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,..., e.g. lora.rank=1,4,16")
        key, raw = item.split("=", 1)
        key = key.strip()
        raws = [r.strip() for r in raw.split(",")]
        if not raw.strip() or any(not r for r in raws):
            raise ConfigError(f"--grid {item!r}: empty value")
        if any(a.key == key for a in axes):
            raise ConfigError(f"--grid {key}: given twice")
        if key in ("seed", "name", "output_dir"):
            raise ConfigError(f"--grid {key}: set by the sweep itself (use --repeat for seeds)")
        values = [parse_override(f"{key}={r}")[1] for r in raws]
        if len(set(map(str, values))) != len(values):
            raise ConfigError(f"--grid {key}: repeated value")
        axes.append(Axis(key, raws, values))
    return axes


def _tag(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.]", "", str(value))


def run_name(name: str, axes: list[Axis], combo: tuple[Any, ...], repeat: int) -> str:
    tags = [f"{a.label}{_tag(v)}" for a, v in zip(axes, combo, strict=True)]
    suffix = "-".join([*tags, f"s{repeat}"])
    return f"{name[: 63 - len(suffix)]}-{suffix}"


def new_sweep_id(name: str) -> str:
    return f"{name[:40]}-{time.strftime('%Y%m%d-%H%M%S')}"


def _checked(config: Path, overrides: list[str], what: str | None, paths: bool) -> JobConfig:
    """Load and (with `paths`) preflight one run's config. `what` (e.g. "--grid lora.rank=0") is
    named as the error's origin; None: the error names the config file or its `--set` item."""
    try:
        return checked_config(config, overrides) if paths else load_config(config, overrides)
    except ConfigError as e:
        if what is None:
            raise
        detail = f"{e.key}: {e.reason}" if e.key is not None else str(e).removeprefix(f"{config}: ")
        raise ConfigError(f"{what}: {detail}", e.key, e.reason) from None


def plan_sweep(
    config: Path,
    grid: list[str],
    *,
    sets: list[str] | None = None,
    repeat: int = 1,
    sweep_id: str | None = None,
    mode: str = "local",
    check_folders: bool = True,
) -> tuple[Sweep, list[JobConfig]]:
    """Validate every grid value, then every combination; returns the sweep and one config per run."""
    if repeat < 1:
        raise ConfigError(f"--repeat {repeat}: must be at least 1")
    sets = list(sets or [])
    base = _checked(config, sets, None, check_folders)
    axes = parse_grid(grid)
    for axis in axes:  # each value alone first: the error names the value
        for raw in axis.raw:
            _checked(config, [*sets, f"{axis.key}={raw}"], f"--grid {axis.key}={raw}", check_folders)
    sid = sweep_id or new_sweep_id(base.name)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}", sid):
        raise ConfigError(f"--id {sid!r}: use letters, digits, '.', '_' and '-'")
    sweep = Sweep(sid, str(config), sets, [{"key": a.key, "values": a.values} for a in axes], repeat, mode)
    configs: list[JobConfig] = []
    for combo_raw in itertools.product(*[a.raw for a in axes]) if axes else [()]:
        combo = tuple(parse_override(f"{a.key}={r}")[1] for a, r in zip(axes, combo_raw, strict=True))
        for k in range(repeat):
            name = run_name(base.name, axes, combo, k)
            over = [*sets, *(f"{a.key}={r}" for a, r in zip(axes, combo_raw, strict=True))]
            over += [f"seed={base.seed + k}", f"name={name}"]
            what = "--grid " + " ".join(f"{a.key}={r}" for a, r in zip(axes, combo_raw, strict=True))
            cfg = _checked(config, over, what if axes else None, False)
            params = {a.key: v for a, v in zip(axes, combo, strict=True)}
            sweep.runs.append(Run(name, params, k, cfg.seed, over, name))
            configs.append(cfg)
    return sweep, configs


# -- the manifest ----------------------------------------------------------------------------------


def write_manifest(folder: Path, sweep: Sweep) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(sweep.to_json(), indent=2, default=str) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def read_manifest(folder: Path) -> Sweep:
    path = Path(folder) / MANIFEST
    try:
        return Sweep.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ConfigError(f"{folder}: not a sweep folder (no {MANIFEST})") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: unreadable manifest ({e})") from None


def sweep_of(out_dir: str | Path) -> str | None:
    """The sweep id of a job whose output folder lies in a sweep folder, else None."""
    if not out_dir:
        return None
    parent = Path(out_dir).parent
    return parent.name if (parent / MANIFEST).is_file() else None


# -- running without a daemon ---------------------------------------------------------------------


def _train_one(cfg_data: dict[str, Any], out: str, threads: int) -> tuple[str, float, str | None]:
    """Worker-process entry: train one run; returns (out, seconds, error or None)."""
    import torch

    from dallm.config import config_from_dict
    from dallm.engine.dispatch import train

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        cfg = config_from_dict(cfg_data)
        resume = Path(out) if (Path(out) / "checkpoints").is_dir() else None
        train(cfg, out_dir=Path(out), resume=resume)
    except Exception as e:  # noqa: BLE001 - one failed run must not end the sweep
        return out, time.perf_counter() - t0, f"{type(e).__name__}: {e}".splitlines()[0]
    return out, time.perf_counter() - t0, None


def run_local(
    folder: Path,
    sweep: Sweep,
    configs: list[JobConfig],
    *,
    workers: int = 1,
    log: Callable[[str], None] = print,
) -> Sweep:
    """Train every run not done yet into `folder/<run>` (`workers` at a time); the manifest is kept
    current after each run, so an interrupted sweep continues where it stopped."""
    todo = []
    for run, cfg in zip(sweep.runs, configs, strict=True):
        if (folder / run.dir / "result.json").is_file():
            run.state = "done" if run.state == "planned" else run.state
            log(f"{run.name}: done already")
            continue
        todo.append((run, cfg))
    write_manifest(folder, sweep)
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0

    def record(run: Run, seconds: float, error: str | None) -> None:
        run.seconds, run.error = round(seconds, 2), error
        run.state = "failed" if error else "done"
        write_manifest(folder, sweep)
        log(f"{run.name}: {'failed: ' + error if error else 'done'} ({seconds:.0f} s)")

    data = [(run, cfg.model_dump(mode="json"), str(folder / run.dir)) for run, cfg in todo]
    if workers <= 1:
        for run, cfg_data, out in data:
            log(f"{run.name}: training")
            _, seconds, error = _train_one(cfg_data, out, threads)
            record(run, seconds, error)
        return sweep
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(_train_one, d, out, threads): run for run, d, out in data}
        for run, _, _ in data:
            log(f"{run.name}: queued")
        for fut in as_completed(futures):
            _, seconds, error = fut.result()
            record(futures[fut], seconds, error)
    except BaseException:  # Ctrl-C: end the running trainings too (they resume from checkpoints)
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return sweep
