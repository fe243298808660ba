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

Guard variants (`guards.md`): the detector replayed offline on each run's logged CS and lr series
with other noise guards -- the engine's own (a check: it must agree with the job; it starts after
the LoRA's warm-up, `monitor.start_step`), the paper's detector fed from step 0 (through the
textual-inversion steps and LR warm-up, where CS jumps from 0 and CSF = Var / lr is inflated by a
small lr), a smaller min_rise, the guard on log10(CSF) (CSF spans orders of magnitude), and larger
windows M (2M, 4M). KID at a replayed turning point is read at the nearest
evaluated step (evaluations are `eval.every` apart), so it is approximate.
"""

from __future__ import annotations

import argparse
import csv
import math
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


def _series(rows: list[dict[str, float]]) -> tuple[list[int], list[float], list[float]]:
    pts = [(int(r["step"]), r["cs"], r["lr"]) for r in rows if "cs" in r and "lr" in r]
    return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]


def replay(
    rows: list[dict[str, float]], window: int, min_rise: float, start: int = 0, log: bool = False
) -> int | None:
    """The turning point of the detector fed the run's (step, cs, lr) from `start` on (None: none)."""
    from dallm.turning import TurningPointDetector, cs_fluctuation

    steps, cs, lr = _series(rows)
    keep = [i for i, s in enumerate(steps) if s > start]
    if not keep:
        return None
    steps, cs, lr = [steps[i] for i in keep], [cs[i] for i in keep], [lr[i] for i in keep]
    det = TurningPointDetector(window, min_rise)
    if not log:
        for st, c, r in zip(steps, cs, lr, strict=True):
            tp = det.update(st, c, r)
            if tp is not None:
                return tp
        return None
    for st, v in zip(steps, cs_fluctuation(cs, window, lr), strict=True):
        if v is not None and v > 0:
            tp = det.observe_csf(st, math.log10(v))
            if tp is not None:
                return tp
    return None


def guards(folder: Path, dest: Path) -> list[str]:
    import tomllib

    sweep = read_manifest(folder)
    runs = [rd for rd in load_runs(folder, sweep) if rd.rows]
    variants: dict[str, Any] = {}
    out_rows = []
    for rd in runs:
        cfg = tomllib.loads((rd.folder / "config.toml").read_text())
        m = cfg.get("monitor", {})
        window, min_rise = int(m.get("window", 10)), float(m.get("min_rise", 0.1))
        warm = max(
            int(cfg.get("tokens", {}).get("ti_steps", 0)), int(cfg.get("train", {}).get("warmup_steps", 0))
        )
        start = m.get("start_step")
        start = warm if start is None else int(start)  # the engine's monitor.start_step, resolved
        variants = {
            f"engine (min_rise {min_rise:g}, step > {start})": lambda r=rd.rows, w=window, mr=min_rise, s=start: (
                replay(r, w, mr, s)
            ),
            "from step 0 (no warm-up guard)": lambda r=rd.rows, w=window, mr=min_rise: replay(r, w, mr),
            f"min_rise 0.02, step > {warm}": lambda r=rd.rows, w=window, s=warm: replay(r, w, 0.02, s),
            f"log10 CSF, step > {warm}": lambda r=rd.rows, w=window, mr=min_rise, s=warm: replay(
                r, w, mr, s, True
            ),
            f"window {2 * window}, step > {warm}": lambda r=rd.rows, w=window, mr=min_rise, s=warm: replay(
                r, 2 * w, mr, s
            ),
            f"window {4 * window}, step > {warm}": lambda r=rd.rows, w=window, mr=min_rise, s=warm: replay(
                r, 4 * w, mr, s
            ),
        }
        steps, vals = series(rd.rows, "kid_val")
        best = min(range(len(vals)), key=vals.__getitem__)
        row = {"run": rd.run.name, "best": int(steps[best]), "kid_best": vals[best], "final": int(steps[-1])}
        for name, fn in variants.items():
            tp = fn()
            near = min(range(len(steps)), key=lambda i, t=tp: abs(steps[i] - t)) if tp is not None else None
            row[name] = tp
            row[name + " kid"] = vals[near] if near is not None else None
        row["engine agrees"] = rd.result.get("turning_point") == row[next(iter(variants))]
        out_rows.append(row)
    lines = ["| run | best val step (KID) | final | " + " | ".join(variants) + " |"]
    lines.append("|" + "---|" * (3 + len(variants)))
    for r in out_rows:
        cells = [f"{_f(r[n])} ({_f(r[n + ' kid'])})" for n in variants]
        lines.append(
            f"| {r['run']} | {r['best']} ({r['kid_best']:.4g}) | {r['final']} | " + " | ".join(cells) + " |"
        )
    summary = []
    for name in variants:
        found = [r for r in out_rows if r[name] is not None]
        if not found:
            summary.append(f"- {name}: no turning point in any of {len(out_rows)} runs")
            continue
        d = [r[name] - r["best"] for r in found]
        regret = [r[name + " kid"] - r["kid_best"] for r in found]
        summary.append(
            f"- {name}: found in {len(found)}/{len(out_rows)}; turning - best step: median {statistics.median(d):+.0f} "
            f"(range {min(d):+d}..{max(d):+d}); val KID there - best: median {statistics.median(regret):.4g}; "
            f"steps saved: median {100 * statistics.median(1 - r[name] / r['final'] for r in found):.0f}%"
        )
    agree = sum(r["engine agrees"] for r in out_rows)
    summary.append(
        f"- the replay of the engine's guard agrees with the jobs' own turning point in {agree}/{len(out_rows)} runs"
    )
    (dest / "guards.md").write_text(
        "\n".join([*summary, "", "Turning step (val KID at the nearest evaluation):", "", *lines]) + "\n"
    )
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", type=Path)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    rows = analyse(args.sweep)
    if not rows:
        print(f"{args.sweep}: no run has a validation KID yet", file=sys.stderr)
        return 1
    dest = args.out or args.sweep / "report"
    write(rows, args.sweep, dest)
    print("\n".join(guards(args.sweep, dest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
