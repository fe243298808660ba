"""Early-stopping policies replayed offline on runs recorded once (`experiments/run.py early_stop_long`).

    python experiments/early_stop.py runs/experiments/early_stop_long [--out DIR] [--metric kid|ppl]

`--metric ppl` replays LLM runs (`experiments/run.py llm_early_stop`): validation perplexity and its
bootstrap std over texts take the validation KID's place (lower is better for both).

Each run trained to its end with `monitor.early_stop = "notify"`, CS logged every step and the
validation KID (with its std over subsets) every `eval.every` steps. Every policy is replayed from
those logs with the engine's own classes (`dallm.monitor.csf.TurningPointDetector` fed exactly as
`dallm.monitor.early_stop.EarlyStop` feeds it, after `monitor.start_step`):

- window M: 5% or 10% of the run; rule: "paper" (Algorithm 1 as written) or "guarded";
- select: "turning" (stop when the turning point is confirmed, return its weights), "best_val_kid"
  (stop there too, return the best validation KID evaluated so far), "turning_then_best" (stop
  `margin` steps later, return the best KID evaluated by then); and, for reference, "run to the end,
  best KID" (no early stop).

Per run and policy: the returned step, the best step (lowest validation KID of all evaluated steps),
KID(returned) - KID(best) in units of the best step's KID std, "within" when that difference is at
most max(std, 10% of the best KID), and the steps saved counted from the stop step. Turning points
fall on window boundaries, which are evaluated steps when `eval.every` divides M (30 | 30, 60).
Runs whose best step is the last evaluated step (still improving) are reported apart.
Writes policies.md and runs.csv into DIR (default: FOLDER/report).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dallm.monitor.csf import TurningPointDetector

RULES = {"paper": {"rule": "paper"}, "guarded": {"rule": "guarded", "min_rise": 0.1}}
WINDOWS = (0.05, 0.1)
SELECTS = ("turning", "best_val_kid", "turning_then_best")
MARGINS = (0.05, 0.1)


@dataclass
class Run:
    name: str
    lr: float
    seed: int
    total: int
    start: int
    cs: list[tuple[int, float, float]]  # (step, cs, lr)
    kid: dict[int, tuple[float, float]]  # step -> (kid_val, std)


def load(folder: Path, metric: str = "kid") -> list[Run]:
    runs = []
    for metrics in sorted(folder.glob("**/metrics.jsonl")):
        d = metrics.parent
        if not (d / "result.json").is_file():
            continue  # still running
        cfg = tomllib.loads((d / "config.toml").read_text())
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        m = cfg.get("monitor", {})
        start = m.get("start_step")
        if start is None:
            start = max(cfg.get("tokens", {}).get("ti_steps", 0), cfg["train"].get("warmup_steps", 0))
        runs.append(
            Run(
                f"{d.parent.name}/{d.name}",
                float(cfg["train"]["lr"]),
                int(cfg.get("seed", 0)),
                int(cfg["train"]["steps"]),
                int(start),
                [(r["step"], r["cs"], r["lr"]) for r in rows if "cs" in r],
                {
                    r["step"]: (r[f"{metric}_val"], r[f"{metric}_val_std"])
                    for r in rows
                    if f"{metric}_val" in r
                },
            )
        )
    return runs


def turning(run: Run, window: int, rule: dict[str, Any]) -> tuple[int | None, int | None]:
    """(turning point, seen_at) of the engine's detector on the run's CS series."""
    det = TurningPointDetector(window, rule["rule"], rule.get("min_rise", 0.1), window)
    for step, cs, lr in run.cs:
        if step <= run.start:
            continue
        tp = det.update(step, cs, lr)
        if tp is not None:
            return tp, step
    return None, None


def replay(run: Run, window: int, rule: dict[str, Any], select: str, margin: int) -> dict[str, Any]:
    tp, seen = turning(run, window, rule)
    stop = (
        run.total if seen is None else min(run.total, seen + (margin if select == "turning_then_best" else 0))
    )
    evaluated = {s: k for s, k in run.kid.items() if s <= stop}
    if select == "turning" or not evaluated:
        ret = tp if tp is not None else stop
    else:
        ret = min(evaluated, key=lambda s: evaluated[s][0])
    return score(run, ret, stop) | {"turning": tp, "seen_at": seen}


def score(run: Run, ret: int, stop: int) -> dict[str, Any]:
    best = min(run.kid, key=lambda s: run.kid[s][0])
    kb, std = run.kid[best]
    k = run.kid.get(ret)
    if k is None:  # not an evaluated step: the nearest evaluated one (only without a window boundary)
        k = run.kid[min(run.kid, key=lambda s: abs(s - ret))]
    diff = k[0] - kb
    return {
        "returned": ret,
        "best": best,
        "stop": stop,
        "kid_returned": k[0],
        "kid_best": kb,
        "std_best": std,
        "regret_std": diff / std if std > 0 else float("inf"),
        "within": diff <= max(std, 0.1 * kb),
        "saved": 1 - stop / run.total,
    }


def policies(total: int) -> list[tuple[str, int, dict[str, Any], str, int]]:
    out = []
    for w in WINDOWS:
        for rname, rule in RULES.items():
            for sel in SELECTS:
                margins = MARGINS if sel == "turning_then_best" else (0,)
                for mg in margins:
                    label = f"M {w:.0%} {rname} {sel}" + (f" +{mg:.0%}" if mg else "")
                    out.append((label, max(2, round(w * total)), rule, sel, round(mg * total)))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--show",
        action="append",
        default=["M 5% paper turning_then_best +5%", "M 5% paper turning", "M 5% guarded turning"],
        help="policies whose per-run rows are listed (default: the engine's defaults and turning alone)",
    )
    p.add_argument("--metric", choices=["kid", "ppl"], default="kid", help="validation KID or perplexity")
    args = p.parse_args()
    runs = load(args.folder, args.metric)
    if not runs:
        print(f"{args.folder}: no finished run with a validation {args.metric}", file=sys.stderr)
        return 1
    dest = args.out or args.folder / "report"
    dest.mkdir(parents=True, exist_ok=True)
    unit = "ppl_val" if args.metric == "ppl" else "KID"
    last = {r.name: max(r.kid) for r in runs}
    improving = [r for r in runs if min(r.kid, key=lambda s: r.kid[s][0]) == last[r.name]]
    lines = [
        f"{len(runs)} runs ({', '.join(r.name for r in runs)}); best step = the last evaluated step "
        f"(still improving) in {len(improving)}: {', '.join(r.name for r in improving) or 'none'}.",
        "",
        f"| policy | within noise (runs) | steps saved, median (min-max) | regret in {unit} std, median (max) "
        "| no turning point |",
        "|---|---|---|---|---|",
    ]
    rows = []
    summary: list[tuple[str, float, float]] = []
    plist = policies(runs[0].total) + [(f"run to the end, best {unit}", 0, {}, "end", 0)]
    for label, window, rule, sel, margin in plist:
        res = []
        for r in runs:
            if sel == "end":
                x = score(r, min(r.kid, key=lambda s: r.kid[s][0]), r.total) | {
                    "turning": None,
                    "seen_at": None,
                }
            else:
                x = replay(r, window, rule, sel, margin)
            res.append(x)
            rows.append({"policy": label, "run": r.name, "lr": r.lr, "seed": r.seed} | x)
        within = sum(x["within"] for x in res)
        saved = [x["saved"] for x in res]
        regret = [x["regret_std"] for x in res]
        none = sum(x["seen_at"] is None for x in res) if sel != "end" else 0
        lines.append(
            f"| {label} | {within}/{len(res)} | {100 * statistics.median(saved):.0f}% "
            f"({100 * min(saved):.0f}-{100 * max(saved):.0f}%) | {statistics.median(regret):.2f} "
            f"({max(regret):.2f}) | {none} |"
        )
        summary.append((label, within / len(res), statistics.median(saved)))
    ok = [s for s in summary if s[1] >= 0.8 and s[2] >= 0.4]
    lines += ["", "Policies with >= 80% of runs within noise and a median >= 40% of steps saved: "]
    lines += [f"- {label}: {100 * w:.0f}% within, {100 * s:.0f}% saved" for label, w, s in ok] or ["- none"]
    for label in args.show:
        lines += [
            "",
            f"Per run, {label}:",
            "",
            f"| run | turning (seen at) | stop | returned | best | {unit} returned - best, in std | within |",
        ]
        lines.append("|---|---|---|---|---|---|---|")
        for x in (r for r in rows if r["policy"] == label):
            seen = f"{x['turning']} ({x['seen_at']})" if x["seen_at"] is not None else "none"
            lines.append(
                f"| {x['run']} | {seen} | {x['stop']} | {x['returned']} | {x['best']} "
                f"| {x['regret_std']:.2f} | {'yes' if x['within'] else 'no'} |"
            )
    with (dest / "runs.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (dest / "policies.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(dest / "policies.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
