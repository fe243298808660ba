"""`dallm report`: the study's figures from any job folder.

Reads `metrics.jsonl` (one JSON object per line with an integer "step" and numeric metrics; rows of
the same step merge, and a step lower than the last one starts a new history from there, as after a
rollback) and `result.json` (the turning point, when one was found), and writes PNGs:

- loss.png     loss (raw and smoothed), with lr and grad_norm panels when logged
- cs.png       CS and CS-Fluctuation, the turning point marked
- kid.png      KID to the training targets, the validation targets (+- std of the mean) and the base
               model (+- std over subsets),
               and the base model's own KID to the targets (dotted: the level to beat)
               (with the final evaluation and KID at the turning point from result.json's "eval")
- ppl.png      (LLM jobs, in kid.png's place) perplexity of the validation texts, the training
               texts and base-distribution text (forgetting), +- bootstrap std, log scale
- samples.png  the sample evolution grid (cells of `samples/` grids as rows, steps as columns)

A plot whose metrics the job did not log is skipped with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dallm.protocol import files

METRICS = files.METRICS_FILE
KID_REFS = (
    ("train", "training targets", "tab:blue"),
    ("val", "validation targets", "tab:orange"),
    ("base", "base model", "tab:gray"),
)


class ReportError(ValueError):
    """A job folder whose metrics cannot be read; one line naming the file (and line)."""


Rows = list[dict[str, float]]


def read_metrics(path: Path) -> Rows:
    """`dallm.protocol.files.read_metrics` (one merged row per step, in step order; a torn last line
    is ignored), with an error for a folder that has no metrics yet."""
    if not path.is_file():
        raise ReportError(f"{path}: no such file (is this a job's output folder?)")
    try:
        rows = files.read_metrics(path)
    except files.MetricsFileError as e:
        raise ReportError(str(e)) from None
    if not rows:
        raise ReportError(f"{path}: empty (no metrics written yet)")
    return rows


def read_result(out_dir: Path) -> dict[str, Any]:
    """`result.json` of a finished job as a dict, or {} (a running job, or not a result file)."""
    return files.result_dict(out_dir)


def read_turning_point(out_dir: Path) -> int | None:
    """The turning point from `result.json`."""
    result = files.read_result(out_dir)
    return result.turning_point if result is not None else None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def merge_final_eval(rows: Rows, result: dict[str, Any]) -> Rows:
    """Add the final evaluation that `result.json` holds ("eval": {"kid_val": ...} at "final_step")
    when metrics.jsonl lacks it (an evaluation made only at the end)."""
    final, ev = result.get("final_step"), result.get("eval")
    if not isinstance(final, int) or not isinstance(ev, dict):
        return rows
    kid = {k: float(v) for k, v in ev.items() if k.startswith(("kid_", "ppl_")) and _number(v)}
    if not kid:
        return rows
    by_step = rows_by_step(rows)
    row = by_step.setdefault(float(final), {"step": float(final)})
    for k, v in kid.items():
        row.setdefault(k, v)
    return [by_step[s] for s in sorted(by_step)]


def turning_kid(result: dict[str, Any]) -> dict[str, float]:
    """KID at the turning point ("eval": {"turning_kid_val": ...}) as {"kid_val": ...}."""
    ev = result.get("eval")
    if not isinstance(ev, dict):
        return {}
    return {
        k.removeprefix("turning_"): float(v)
        for k, v in ev.items()
        if k.startswith(("turning_kid_", "turning_ppl_")) and _number(v)
    }


def series(rows: Rows, key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def cs_fluct_series(rows: Rows) -> tuple[list[float], list[float]]:
    """CS-Fluctuation against the step it describes: the engine logs it when its windows are full,
    3(M-1) steps later, with that step as `cs_fluct_step` (where a turning point is placed)."""
    pts = [
        (r.get("cs_fluct_step", r["step"]), r["cs_fluct"])
        for r in rows
        if "cs_fluct" in r and math.isfinite(r["cs_fluct"])
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def _smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, debiased at the start (as TensorBoard draws it)."""
    out, acc = [], 0.0
    for t, v in enumerate(values, start=1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight**t))
    return out


def _figure(panels: int) -> tuple[Any, list[Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(panels, 1, figsize=(7, 2.6 * panels + 0.6), sharex=True, squeeze=False)
    return fig, list(axes[:, 0])


def _save(fig: Any, path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.axes[-1].set_xlabel("step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mark_turning(axes: Sequence[Any], turning: int | None) -> None:
    if turning is None:
        return
    for i, ax in enumerate(axes):
        ax.axvline(
            turning,
            color="tab:red",
            linestyle="--",
            linewidth=1.2,
            label=f"turning point ({turning})" if i == 0 else None,
        )


def plot_loss(rows: Rows, path: Path, title: str) -> Path | str:
    steps, loss = series(rows, "loss")
    if not steps:
        return "no loss logged"
    extra = [k for k in ("lr", "grad_norm") if len(set(series(rows, k)[1])) > 1]  # constant lr: no panel
    fig, axes = _figure(1 + len(extra))
    axes[0].plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    axes[0].plot(steps, _smooth(loss), color="tab:blue", linewidth=1.6, label="loss (smoothed)")
    axes[0].set_ylabel("loss")
    axes[0].legend(loc="upper right")
    for ax, key in zip(axes[1:], extra, strict=True):
        ax.plot(*series(rows, key), color="tab:green", linewidth=1.0)
        ax.set_ylabel(key)
    return _save(fig, path, f"{title}: training loss")


def plot_cs(rows: Rows, turning: int | None, path: Path, title: str) -> Path | str:
    cs, fl = series(rows, "cs"), cs_fluct_series(rows)
    if not cs[0] and not fl[0]:
        return "no cs / cs_fluct logged"
    fig, axes = _figure(2)
    axes[0].plot(*cs, color="tab:purple", linewidth=1.2)
    axes[0].set_ylabel("CS")
    axes[1].plot(*fl, color="tab:brown", linewidth=1.2)
    axes[1].set_ylabel("CS-Fluctuation")
    if fl[1] and min(fl[1]) > 0 and max(fl[1]) / min(fl[1]) > 100:
        axes[1].set_yscale("log")
    _mark_turning(axes, turning)
    if turning is not None:
        axes[0].legend(loc="best")
    return _save(fig, path, f"{title}: CS and CS-Fluctuation")


PPL_REFS = (
    ("train", "training texts", "tab:blue"),
    ("val", "validation texts", "tab:orange"),
    ("base", "base-distribution text", "tab:gray"),
)


def plot_kid(
    rows: Rows,
    turning: int | None,
    path: Path,
    title: str,
    at_turning: dict[str, float] | None = None,
    metric: str = "kid",
) -> Path | str:
    """KID (image jobs) or, with metric = "ppl", perplexity (LLM jobs; log scale) at each evaluation."""
    refs = PPL_REFS if metric == "ppl" else KID_REFS
    name = "perplexity" if metric == "ppl" else "KID"
    present = [(ref, label, color) for ref, label, color in refs if series(rows, f"{metric}_{ref}")[0]]
    if not present:
        return f"no {metric}_* metrics logged (eval.every = 0?)"
    fig, axes = _figure(1)
    ax = axes[0]
    by_step = rows_by_step(rows)
    for ref, label, color in present:
        steps, mean = series(rows, f"{metric}_{ref}")
        std = [by_step[s].get(f"{metric}_{ref}_std", 0.0) for s in steps]
        on = "on" if metric == "ppl" else "to"
        ax.plot(steps, mean, marker="o", markersize=3, color=color, label=f"{name} {on} {label}")
        if any(std):
            lo = [m - s for m, s in zip(mean, std, strict=True)]
            hi = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(steps, lo, hi, color=color, alpha=0.2, linewidth=0)
        base_level = series(rows, f"base_{metric}_{ref}")[1]
        if base_level:
            ax.axhline(
                base_level[-1], color=color, linestyle=":", linewidth=1.2, label=f"base model {on} {label}"
            )
        if turning is not None and at_turning and f"{metric}_{ref}" in at_turning:
            ax.plot(
                [turning],
                [at_turning[f"{metric}_{ref}"]],
                marker="*",
                markersize=12,
                color=color,
                linestyle="",
            )
    if metric == "ppl":
        ax.set_yscale("log")
    else:
        ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylabel(name)
    _mark_turning(axes, turning)
    fig.set_size_inches(9.5, 3.6)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    # the validation KID's band is the std of its mean (bootstrap); the others' the std over subsets
    spread = (
        "bootstrap std over texts"
        if metric == "ppl"
        else "val: +- std of the mean; others: +- std over subsets"
    )
    return _save(fig, path, f"{title}: {name} ({spread})")


def rows_by_step(rows: Rows) -> dict[float, dict[str, float]]:
    return {r["step"]: r for r in rows}


def plot_samples(out_dir: Path, path: Path) -> Path | str:
    from dallm.eval.sample_grids import evolution_figure

    figure = evolution_figure(out_dir)
    if figure is None:
        return "no sample grids in samples/ (samples.every = 0?)"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(path)
    return path


def write_report(out_dir: Path, dest: Path | None = None) -> dict[str, Path | str]:
    """Write the plots; returns name -> written path, or the reason it was skipped."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ReportError(f"{out_dir}: no such job folder")
    result = read_result(out_dir)
    rows = merge_final_eval(read_metrics(out_dir / METRICS), result)
    turning = read_turning_point(out_dir)
    dest = Path(dest) if dest is not None else out_dir / "report"
    title = out_dir.resolve().name
    plots: dict[str, Path | str] = {
        "loss": plot_loss(rows, dest / "loss.png", title),
        "cs": plot_cs(rows, turning, dest / "cs.png", title),
    }
    if any(k.startswith("ppl_") for r in rows for k in r):  # an LLM job: perplexities, text samples
        plots["ppl"] = plot_kid(rows, turning, dest / "ppl.png", title, turning_kid(result), metric="ppl")
        return plots
    plots["kid"] = plot_kid(rows, turning, dest / "kid.png", title, turning_kid(result))
    plots["samples"] = plot_samples(out_dir, dest / "samples.png")
    return plots
