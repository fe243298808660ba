"""`dallm report --sweep`: compare the runs of a sweep (the study's Figs. 4-8 across values).

For each grid key (or the seeds alone when the sweep has no grid):

- kid_<key>.png       KID to the training and to the validation targets against step, one line per
                      value (mean over the runs with that value, band min..max over seeds)
- final_kid_<key>.png final KID (train, validation) against the value, error bars = std over seeds
- samples_<key>.png   sample evolution side by side: per value (first seed), the first sample cell
                      at each sample step
- table.md / table.csv one row per run: values, seed, steps, turning point, KID (final, best
                      validation and its step, at the turning point), trainable parameters, result
                      size on disk, training s/step, sampling s/image, wall time
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dallm.config import ConfigError
from dallm.report.job import ReportError, merge_final_eval, read_metrics, read_result, series, turning_kid
from dallm.sweep import MANIFEST, Run, Sweep, read_manifest

WEIGHT_FILES = ("*.safetensors", "unet/*.safetensors")  # the result (not checkpoints/)


@dataclass
class RunData:
    run: Run
    folder: Path
    rows: list[dict[str, float]] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


def find_sweep(ref: str | Path, home: str | None = None) -> Path:
    """A sweep folder from a folder path or a sweep id (./runs/<id>, then <daemon home>/jobs/<id>)."""
    p = Path(ref).expanduser()
    if (p / MANIFEST).is_file():
        return p
    candidates = [Path("runs") / str(ref)]
    try:
        from dallm.client.home import resolve_home

        candidates.append(Path(resolve_home(home)) / "jobs" / str(ref))
    except Exception:  # noqa: BLE001 - no daemon home: only the local folders
        pass
    for c in candidates:
        if (c / MANIFEST).is_file():
            return c
    raise ConfigError(
        f"--sweep {ref}: no sweep folder or id (looked in {', '.join(map(str, [p, *candidates]))})"
    )


def _weights(folder: Path) -> tuple[int, int]:
    """(parameters, bytes) of the result's weight files (safetensors headers only)."""
    from safetensors import safe_open

    params = size = 0
    for pattern in WEIGHT_FILES:
        for path in sorted(folder.glob(pattern)):
            size += path.stat().st_size
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    params += math.prod(f.get_slice(key).get_shape())
    return params, size


def _sample_cells(folder: Path) -> int:
    from dallm.eval.sample_grids import read_index

    return sum(r.rows * r.cols for r in read_index(folder) if r.step is not None)


def run_stats(rd: RunData) -> dict[str, Any]:
    rows, res = rd.rows, rd.result
    s: dict[str, Any] = {"name": rd.run.name, **rd.run.params, "seed": rd.run.seed}
    s["final_step"] = res.get("final_step", int(rows[-1]["step"]) if rows else None)
    s["turning_point"] = res.get("turning_point")
    s["result_step"] = res.get("result_step")
    for ref in ("train", "val", "base"):
        steps, vals = series(rows, f"kid_{ref}")
        s[f"kid_{ref}_final"] = vals[-1] if vals else None
    steps, vals = series(rows, "kid_val")
    if vals:
        i = min(range(len(vals)), key=vals.__getitem__)
        s["kid_val_best"], s["best_val_step"] = vals[i], int(steps[i])
    at_tp = turning_kid(res)
    s["kid_val_turning"] = at_tp.get("kid_val")
    s["kid_train_turning"] = at_tp.get("kid_train")
    rates = [r["steps_per_s"] for r in rows if r.get("steps_per_s")]
    s["train_s_per_step"] = statistics.median(1.0 / r for r in rates) if rates else None
    ev = res.get("eval") if isinstance(res.get("eval"), dict) else {}
    cells = _sample_cells(rd.folder) if (rd.folder / "samples").is_dir() else 0
    sample_s = ev.get("sample_seconds_total")
    s["sample_s_per_image"] = sample_s / cells if sample_s and cells else None
    s["trainable_params"], s["result_bytes"] = _weights(rd.folder) if rd.folder.is_dir() else (0, 0)
    s["wall_s"] = rd.run.seconds if rd.run.seconds is not None else ev.get("wall_seconds")
    return s


def load_runs(folder: Path, sweep: Sweep) -> list[RunData]:
    out = []
    for run in sweep.runs:
        rd = RunData(run, folder / run.dir)
        try:
            rd.rows = merge_final_eval(read_metrics(rd.folder / "metrics.jsonl"), read_result(rd.folder))
        except ReportError:
            rd.rows = []
        rd.result = read_result(rd.folder)
        rd.stats = run_stats(rd)
        out.append(rd)
    return out


# -- figures ---------------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _groups(runs: list[RunData], key: str) -> dict[Any, list[RunData]]:
    g: dict[Any, list[RunData]] = defaultdict(list)
    for rd in runs:
        g[rd.run.params.get(key, rd.run.seed) if key != "seed" else rd.run.seed].append(rd)
    return dict(g)


def _ordered(groups: dict[Any, list[RunData]]) -> list[tuple[Any, list[RunData]]]:
    """Numbers in numeric order, then the rest by name (lora.rank 1, 4, 16; not 1, 16, 4)."""
    num = lambda v: isinstance(v, int | float) and not isinstance(v, bool)  # noqa: E731
    return sorted(groups.items(), key=lambda kv: (not num(kv[0]), kv[0] if num(kv[0]) else 0, str(kv[0])))


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def plot_kid_vs_step(runs: list[RunData], key: str, path: Path) -> Path | str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    drawn = False
    for gi, (value, group) in enumerate(_ordered(_groups(runs, key))):
        color = f"C{gi % 10}"
        for ax, ref in zip(axes, ("train", "val"), strict=True):
            by_step: dict[float, list[float]] = defaultdict(list)
            for rd in group:
                for st, v in zip(*series(rd.rows, f"kid_{ref}"), strict=True):
                    by_step[st].append(v)
            if not by_step:
                continue
            steps = sorted(by_step)
            mean = [statistics.fmean(by_step[s]) for s in steps]
            ax.plot(
                steps,
                mean,
                marker="o",
                markersize=3,
                color=color,
                label=f"{key}={_fmt(value)} (n={len(group)})",
            )
            if len(group) > 1:
                ax.fill_between(
                    steps,
                    [min(by_step[s]) for s in steps],
                    [max(by_step[s]) for s in steps],
                    color=color,
                    alpha=0.15,
                )
            drawn = True
    if not drawn:
        plt.close(fig)
        return "no kid_train / kid_val logged by any run"
    for ax, ref in zip(axes, ("training targets", "validation targets"), strict=True):
        ax.set_title(f"KID to the {ref}")
        ax.set_xlabel("step")
        ax.axhline(0, color="black", linewidth=0.5)
    axes[0].set_ylabel("KID (mean over seeds; band: min..max)")
    axes[0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_final_kid(runs: list[RunData], key: str, path: Path) -> Path | str:
    plt = _plt()
    groups = _ordered(_groups(runs, key))
    fig, ax = plt.subplots(figsize=(6, 3.8))
    xs = list(range(len(groups)))
    drawn = False
    for off, ref, color in ((-0.08, "train", "tab:blue"), (0.08, "val", "tab:orange")):
        means, stds, pos = [], [], []
        for x, (_, group) in zip(xs, groups, strict=True):
            vals = [
                rd.stats[f"kid_{ref}_final"] for rd in group if rd.stats.get(f"kid_{ref}_final") is not None
            ]
            if vals:
                means.append(statistics.fmean(vals))
                stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
                pos.append(x + off)
                ax.scatter([x + off] * len(vals), vals, color=color, alpha=0.35, s=12)
        if means:
            ax.errorbar(pos, means, yerr=stds, color=color, marker="o", capsize=4, label=f"final KID ({ref})")
            drawn = True
    if not drawn:
        plt.close(fig)
        return "no final KID in any run"
    ax.set_xticks(xs, [_fmt(v) for v, _ in groups])
    ax.set_xlabel(key)
    ax.set_ylabel("KID (mean +- std over seeds)")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def samples_side_by_side(runs: list[RunData], key: str, path: Path, max_frames: int = 10) -> Path | str:
    """Rows: values (first seed's run); columns: sample steps; cell: the first prompt x first seed."""
    from dallm.eval.sample_grids import _cells, labelled_grid, pick_frames, read_index

    rows, labels, cols = [], [], None
    for value, group in _ordered(_groups(runs, key)):
        rd = min(group, key=lambda r: r.run.seed)
        records = (
            [r for r in read_index(rd.folder) if r.step is not None]
            if (rd.folder / "samples").is_dir()
            else []
        )
        if not records:
            continue
        frames = pick_frames(records, max_frames)
        if cols is None:
            cols = [str(r.step) for r in frames]
        frames = frames[: len(cols)]
        cells = [_cells(rd.folder, r)[0] for r in frames]
        rows.append(cells + [cells[-1]] * (len(cols) - len(cells)))
        labels.append(f"{key}={_fmt(value)}")
    if not rows or cols is None:
        return "no sample grids in any run"
    labelled_grid(rows, [f"step {c}" for c in cols], labels).save(path)
    return path


# -- the table -------------------------------------------------------------------------------------

COLUMNS = [
    "final_step", "turning_point", "kid_train_final", "kid_val_final", "kid_base_final", "kid_val_best",
    "best_val_step", "kid_val_turning", "trainable_params", "result_bytes", "train_s_per_step",
    "sample_s_per_image", "wall_s",
]  # fmt: skip


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_table(runs: list[RunData], keys: list[str], dest: Path) -> tuple[Path, Path]:
    header = ["name", *keys, "seed", *COLUMNS]
    with (dest / "table.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for rd in runs:
            w.writerow(["" if rd.stats.get(h) is None else rd.stats.get(h) for h in header])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(rd.stats.get(h)) for h in header) + " |" for rd in runs]
    summary = _summary(runs, keys)
    (dest / "table.md").write_text("\n".join(summary + ["", "Runs:", "", *lines]) + "\n")
    return dest / "table.md", dest / "table.csv"


def _summary(runs: list[RunData], keys: list[str]) -> list[str]:
    """Per value of each key: mean +- std over its runs of the final and best validation KID."""
    out = []
    for key in keys or ["seed"]:
        out += [f"By {key} (mean +- std over runs):", ""]
        out += [
            f"| {key} | runs | final KID train | final KID val | best KID val | s/step | params | bytes |"
        ]
        out += ["|---|---|---|---|---|---|---|---|"]
        for value, group in _ordered(_groups(runs, key)):

            def agg(col: str, group: list[RunData] = group) -> str:
                vals = [rd.stats[col] for rd in group if isinstance(rd.stats.get(col), int | float)]
                if not vals:
                    return "-"
                if all(isinstance(v, int) for v in vals) and len(set(vals)) == 1:
                    return str(vals[0])  # parameters, bytes: the same for every seed
                m = statistics.fmean(vals)
                return f"{m:.4g} +- {statistics.stdev(vals):.2g}" if len(vals) > 1 else f"{m:.4g}"

            cols = ["kid_train_final", "kid_val_final", "kid_val_best", "train_s_per_step"]
            out.append(
                f"| {_fmt(value)} | {len(group)} | "
                + " | ".join(agg(c) for c in cols)
                + f" | {agg('trainable_params')} | {agg('result_bytes')} |"
            )
        out.append("")
    return out


def write_sweep_report(folder: Path, dest: Path | None = None) -> dict[str, Path | str]:
    folder = Path(folder)
    sweep = read_manifest(folder)
    dest = Path(dest) if dest is not None else folder / "report"
    dest.mkdir(parents=True, exist_ok=True)
    runs = load_runs(folder, sweep)
    keys = [g["key"] for g in sweep.grid]
    results: dict[str, Path | str] = {}
    for key in keys or ["seed"]:
        tag = key.replace(".", "_")
        results[f"kid_{tag}"] = plot_kid_vs_step(runs, key, dest / f"kid_{tag}.png")
        results[f"final_kid_{tag}"] = plot_final_kid(runs, key, dest / f"final_kid_{tag}.png")
        results[f"samples_{tag}"] = samples_side_by_side(runs, key, dest / f"samples_{tag}.png")
    md, csv_path = write_table(runs, keys, dest)
    results["table_md"], results["table_csv"] = md, csv_path
    return results
