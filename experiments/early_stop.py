"""Early-stopping validation: where the turning point (second valley of CS-Fluctuation) lands
against the best validation KID, over the runs of a sweep (`experiments/run.py early_stop`).

    python experiments/early_stop.py runs/experiments/early_stop [--out DIR]

Per run: the turning-point step, the best-validation-KID step (over the evaluated steps), the final
step; validation KID at each (at the turning point as the job measured it from the exact weights of
that step); the compute saved by stopping there (1 - turning / final steps); the verdict:

- "near"  the turning point lies within one evaluation interval of the best step,
- "early" / "late" otherwise; and "within noise" when its KID exceeds the best by no more than the
  KID's own spread (the std over subsets at the best step) -- stopping there costs nothing measurable.

Writes early_stop.md, early_stop.csv and early_stop.png (validation KID against step per run, the
turning point and the best step marked) into DIR (default: the sweep's report/ folder).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path
from typing import Any

from dallm.report import series
from dallm.sweep import read_manifest
from dallm.sweep_report import load_runs


def analyse(folder: Path) -> list[dict[str, Any]]:
    sweep = read_manifest(folder)
    rows = []
    for rd in load_runs(folder, sweep):
        if not rd.rows:
            continue
        steps, vals = series(rd.rows, "kid_val")
        _, stds = series(rd.rows, "kid_val_std")
        if not vals:
            continue
        i = min(range(len(vals)), key=vals.__getitem__)
        every = min((b - a for a, b in zip(steps, steps[1:], strict=False)), default=1.0)
        final = int(rd.result.get("final_step", steps[-1]))
        tp = rd.result.get("turning_point")
        ev = rd.result.get("eval") or {}
        r: dict[str, Any] = {
            "run": rd.run.name,
            **{k.rsplit(".", 1)[-1]: v for k, v in rd.run.params.items()},
            "seed": rd.run.seed,
            "turning_step": tp,
            "best_step": int(steps[i]),
            "final_step": final,
            "kid_val_turning": ev.get("turning_kid_val"),
            "kid_val_best": vals[i],
            "kid_val_final": vals[-1],
            "kid_val_std_best": stds[i] if i < len(stds) else None,
            "saved": None,
            "verdict": "no turning point",
        }
        if tp is not None:
            r["saved"] = 1 - tp / final
            d = tp - steps[i]
            r["verdict"] = "near" if abs(d) <= every else ("early" if d < 0 else "late")
            kt = r["kid_val_turning"]
            if kt is not None and r["kid_val_std_best"] is not None:
                r["verdict"] += ", within noise" if kt - vals[i] <= r["kid_val_std_best"] else ", worse"
        rows.append(r)
    return rows


def _f(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write(rows: list[dict[str, Any]], folder: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0]) if rows else []
    with (dest / "early_stop.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_f(r[k]) for k in keys) + " |" for r in rows]
    found = [r for r in rows if r["turning_step"] is not None]
    summary = [f"{len(rows)} runs; a turning point in {len(found)}."]
    if found:
        verdicts: dict[str, int] = {}
        for r in found:
            verdicts[r["verdict"]] = verdicts.get(r["verdict"], 0) + 1
        summary.append("Verdicts: " + ", ".join(f"{k}: {v}" for k, v in sorted(verdicts.items())) + ".")
        summary.append(
            f"Compute saved (mean): {100 * statistics.fmean(r['saved'] for r in found):.0f}% of the steps."
        )
        regret = [r["kid_val_turning"] - r["kid_val_best"] for r in found if r["kid_val_turning"] is not None]
        if regret:
            summary.append(
                f"Validation KID at the turning point minus the best: median {statistics.median(regret):.4g}, "
                f"max {max(regret):.4g}; final minus best: median "
                f"{statistics.median(r['kid_val_final'] - r['kid_val_best'] for r in found):.4g}."
            )
    (dest / "early_stop.md").write_text("\n".join([*summary, "", *lines]) + "\n")
    _plot(rows, folder, dest / "early_stop.png")
    print("\n".join(summary))
    print(dest / "early_stop.md")


def _plot(rows: list[dict[str, Any]], folder: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = read_manifest(folder)
    data = {rd.run.name: rd for rd in load_runs(folder, sweep)}
    n = len(rows)
    cols = min(4, n) or 1
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(3.2 * cols, 2.4 * -(-n // cols)), squeeze=False)
    for ax, r in zip(axes.flat, rows, strict=False):
        steps, vals = series(data[r["run"]].rows, "kid_val")
        ax.plot(steps, vals, marker="o", markersize=3, color="tab:orange")
        ax.axvline(r["best_step"], color="tab:green", linestyle=":", label="best val KID")
        if r["turning_step"] is not None:
            ax.axvline(r["turning_step"], color="tab:red", linestyle="--", label="turning point")
            if r["kid_val_turning"] is not None:
                ax.plot(
                    [r["turning_step"]], [r["kid_val_turning"]], marker="*", color="tab:red", markersize=10
                )
        ax.set_title(r["run"], fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle("validation KID vs step; turning point (red) and best step (green)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", type=Path)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    rows = analyse(args.sweep)
    if not rows:
        print(f"{args.sweep}: no run has a validation KID yet", file=sys.stderr)
        return 1
    write(rows, args.sweep, args.out or args.sweep / "report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
