"""Replay of early-stopping policies on packed micro-LLM logs (`experiments/llm_stop.py replay`).

Every policy chooses on `ppl_val` and CS only; every returned checkpoint is scored on the fresh
held-out teacher set (`ppl_fresh`, logged as ppl_base by `llm_stop.py record`), which played no
part in any choice. Per run and policy:
- stop: the step training would end at; steps saved = 1 - stop / planned steps;
- returned: the step whose weights are returned (an evaluated step; a turning point between two
  evaluations is scored at the nearest evaluated step);
- regret = ppl_fresh(returned) / ppl_fresh(best) - 1, best = the evaluated step with the lowest
  fresh perplexity (an oracle no policy can see); "within 10%" when regret <= 0.10.
Summaries: median regret (min-max), runs within 10%, steps saved, and the paired difference of
regret against the fixed 20% stop (mean over runs, bootstrap 95% interval over runs). "pass": median
regret <= 5%, >= 80% of runs within 10%, and the upper bound of that interval <= +1 point (`NOT_WORSE`).

CS policies use the engine's detector (`dallm.monitor.csf.TurningPointDetector`, fed after
`monitor.start_step` as `dallm.monitor.early_stop.EarlyStop` feeds it), windows resolved as the
engine resolves them (`dallm.monitor.window.span_steps`: steps, epochs of the run's training set,
or a fraction of the plan). One CS policy is chosen on the tuning seeds (lowest median regret,
then most steps saved) and reported, with the rest, on the other seeds.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dallm.monitor.csf import TurningPointDetector
from dallm.monitor.window import span_steps, steps_per_epoch

START = 15  # monitor.start_step of the recorded runs (llm_stop.py record)
# With batch = all texts an epoch is one step: "1 epoch" resolves to the detector's minimum, 2 steps.
WINDOWS = {
    "M 100 steps": 100,
    "M 5%": 0.05,
    "M 30 steps": 30,
    "M 50 steps": 50,
    "M 150 steps": 150,
    "M 1 epoch": "1 epochs",
    "M 10 epochs": "10 epochs",
}
RULES = {"paper": ("paper", 0.1), "guarded": ("guarded", 0.1)}
SELECTS = {"turning": 0, "best so far": 0, "then best +30": 30, "then best +100": 100}
REFERENCE = "fixed 20%, best ppl_val"
# "Not worse than the fixed 20% stop (paired)": the upper 95% bound of the mean paired regret
# difference is at most 1 point of regret (1% ppl), the LLM analogue of the image test's 0.02 KID.
NOT_WORSE = 0.01


@dataclass
class Run:
    name: str
    head: dict
    cs: list[tuple[int, float, float]]  # (step, cs, lr)
    val: dict[int, tuple[float, float]]  # step -> (ppl_val, std)
    fresh: dict[int, float]  # step -> ppl on the fresh held-out teacher set

    @property
    def total(self) -> int:
        return int(self.head["steps"])


def load(folder: Path) -> list[Run]:
    runs = []
    for path in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            head, *rows = [json.loads(x) for x in f if x.strip()]
        runs.append(
            Run(
                path.name.removesuffix(".jsonl.gz"),
                head,
                [(r["step"], r["cs"], r["lr"]) for r in rows if "cs" in r],
                {r["step"]: (r["ppl_val"], r["ppl_val_std"]) for r in rows if "ppl_val" in r},
                {r["step"]: r["ppl_base"] for r in rows if "ppl_base" in r},
            )
        )
    return runs


def best_val(run: Run, upto: int) -> int:
    """The evaluated step <= `upto` with the lowest ppl_val."""
    seen = [s for s in run.val if s <= upto]
    return min(seen, key=lambda s: run.val[s][0]) if seen else min(run.val)


def turning(run: Run, window: int, rule: str, min_rise: float) -> tuple[int | None, int | None]:
    """(turning point, step it was confirmed at) of the engine's detector on the run's CS series."""
    det = TurningPointDetector(window, rule, min_rise, window)  # type: ignore[arg-type]
    for step, cs, lr in run.cs:
        if step <= START:
            continue
        tp = det.update(step, cs, lr)
        if tp is not None:
            return tp, step
    return None, None


Policy = Callable[[Run], tuple[int, int]]  # run -> (stop, returned)


def cs_policy(span: int | float | str, rule: str, min_rise: float, select: str) -> Policy:
    margin = SELECTS[select]

    def apply(run: Run) -> tuple[int, int]:
        epoch = steps_per_epoch(int(run.head["texts"]), int(run.head["texts"]))
        window = span_steps(span, run.total, 2, epoch)
        tp, seen = turning(run, window, rule, min_rise)
        if seen is None:  # never confirmed: the run goes to its end
            return run.total, (run.total if select == "turning" else best_val(run, run.total))
        stop = min(run.total, seen + margin)
        return stop, (tp if select == "turning" else best_val(run, stop))

    return apply


def fixed(fraction: float, weights_at_stop: bool = False) -> Policy:
    def apply(run: Run) -> tuple[int, int]:
        stop = round(fraction * run.total)
        return stop, (stop if weights_at_stop else best_val(run, stop))

    return apply


def patience(evals: int) -> Policy:
    """Stop after `evals` evaluations in a row without a lower ppl_val; return the best."""

    def apply(run: Run) -> tuple[int, int]:
        best, wait = float("inf"), 0
        for s in sorted(run.val):
            if run.val[s][0] < best:
                best, wait = run.val[s][0], 0
            else:
                wait += 1
                if wait >= evals:
                    return s, best_val(run, s)
        return run.total, best_val(run, run.total)

    return apply


def policies() -> dict[str, Policy]:
    out: dict[str, Policy] = {}
    for wname, span in WINDOWS.items():
        for rname, (rule, rise) in RULES.items():
            for sel in SELECTS:
                out[f"CS {wname}, {rname}, {sel}"] = cs_policy(span, rule, rise, sel)
    out |= {
        REFERENCE: fixed(0.2),
        "fixed 30%, best ppl_val": fixed(0.3),
        "fixed 20%, its weights": fixed(0.2, True),
        "ppl_val patience 2 evals": patience(2),
        "ppl_val patience 4 evals": patience(4),
        "end, best ppl_val": lambda r: (r.total, best_val(r, r.total)),
        "end, last weights": lambda r: (r.total, r.total),
    }
    return out


def score(run: Run, stop: int, ret: int) -> dict:
    at = min(run.fresh, key=lambda s: (abs(s - ret), s))  # the nearest evaluated step
    oracle = min(run.fresh, key=lambda s: run.fresh[s])
    regret = run.fresh[at] / run.fresh[oracle] - 1
    return {"stop": stop, "returned": at, "oracle": oracle, "regret": regret, "saved": 1 - stop / run.total}


def bootstrap_mean(x: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(x, k=len(x))) for _ in range(n))
    return statistics.fmean(x), means[int(0.025 * n)], means[int(0.975 * n) - 1]


def summarise(res: dict[str, dict[str, dict]], names: list[str], runs: list[str]) -> list[dict]:
    rows = []
    for p in names:
        reg = [res[p][r]["regret"] for r in runs]
        saved = [res[p][r]["saved"] for r in runs]
        diff = [res[p][r]["regret"] - res[REFERENCE][r]["regret"] for r in runs]
        mean, lo, hi = bootstrap_mean(diff)
        rows.append(
            {
                "policy": p,
                "median": statistics.median(reg),
                "min": min(reg),
                "max": max(reg),
                "within": sum(g <= 0.10 for g in reg),
                "n": len(runs),
                "saved": statistics.median(saved),
                "saved_min": min(saved),
                "saved_max": max(saved),
                "diff": mean,
                "lo": lo,
                "hi": hi,
            }
        )
    return rows


def table(rows: list[dict]) -> list[str]:
    out = [
        "| policy | regret (fresh ppl), median (min-max) | within 10% | steps saved, median (min-max) "
        "| regret - fixed 20%, mean [95% CI] | pass |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = r["median"] <= 0.05 and r["within"] >= 0.8 * r["n"] and r["hi"] <= NOT_WORSE
        out.append(
            f"| {r['policy']} | {100 * r['median']:.1f}% ({100 * r['min']:.1f}-{100 * r['max']:.1f}%) "
            f"| {r['within']}/{r['n']} | {100 * r['saved']:.0f}% ({100 * r['saved_min']:.0f}-"
            f"{100 * r['saved_max']:.0f}%) | {100 * r['diff']:+.1f} [{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}] "
            f"| {'yes' if ok else 'no'} |"
        )
    return out


def precondition(runs: list[Run]) -> list[str]:
    """Per run: the step of the lowest ppl_val, end / minimum and (end - minimum) in combined stds."""
    out = [
        "| run | min ppl_val step | min ppl_val ± std | end ppl_val ± std | end / min | (end - min) / std "
        "| min fresh step | precondition |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ok = 0
    for r in runs:
        s = min(r.val, key=lambda k: r.val[k][0])
        (m, sm), (e, se) = r.val[s], r.val[max(r.val)]
        z = (e - m) / max((sm**2 + se**2) ** 0.5, 1e-12)
        good = s < r.total / 2 and e >= 1.05 * m and z >= 3
        ok += good
        fs = min(r.fresh, key=lambda k: r.fresh[k])
        out.append(
            f"| {r.name} | {s} | {m:.3f} ± {sm:.3f} | {e:.3f} ± {se:.3f} | {e / m:.3f} | {z:.0f} | {fs} "
            f"| {'yes' if good else 'no'} |"
        )
    out.append(f"\nPrecondition met in {ok}/{len(runs)} runs (>= 80% needed).")
    return out


def windows_table(runs: list[Run]) -> list[str]:
    """Where the turning point falls for each window (paper rule): it follows M, not the curve."""
    out = [
        "| window (paper rule) | M (steps) | turning point, median (min-max) | confirmed at, median (min-max) "
        "| none | best ppl_val step, median (min-max) |",
        "|---|---|---|---|---|---|",
    ]
    best = [min(r.val, key=lambda k: r.val[k][0]) for r in runs]
    for wname, span in WINDOWS.items():
        tps, seen, none = [], [], 0
        for r in runs:
            window = span_steps(span, r.total, 2, steps_per_epoch(int(r.head["texts"]), int(r.head["texts"])))
            tp, at = turning(r, window, "paper", 0.1)
            if tp is None or at is None:
                none += 1
            else:
                tps.append(tp)
                seen.append(at)
        if not tps:
            continue
        out.append(
            f"| {wname} | {window} | {statistics.median(tps):.0f} ({min(tps)}-{max(tps)}) "
            f"| {statistics.median(seen):.0f} ({min(seen)}-{max(seen)}) | {none} "
            f"| {statistics.median(best):.0f} ({min(best)}-{max(best)}) |"
        )
    return out


def setting(run: Run) -> str:
    return f"{run.head['lr_scheduler']}, lr {float(run.head['lr']):g}"


def replay_main(args: argparse.Namespace) -> int:
    from llm_stop import seeds_arg

    runs = load(args.folder)
    if not runs:
        print(f"{args.folder}: no packed run")
        return 1
    plist = policies()
    res = {p: {r.name: score(r, *f(r)) for r in runs} for p, f in plist.items()}
    tune_seeds = set(seeds_arg(args.tune_seeds))
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(setting(r), []).append(r)
    lines = ["## Precondition", ""]
    for name, group in groups.items():
        lines += [f"{name}:", "", *precondition(group), ""]
    lines += ["## The turning point against the window (all runs)", "", *windows_table(runs), ""]
    # One CS policy, chosen on the tuning seeds of one setting; every other run is a test run.
    tune = [r.name for r in groups.get(args.tune_setting, []) if r.head["seed"] in tune_seeds]
    if not tune:
        print(f"no run of {args.tune_setting!r} with a seed in {sorted(tune_seeds)} to tune on")
        return 1
    cs_names = [p for p in plist if p.startswith("CS ")]
    tuned = min(summarise(res, cs_names, tune), key=lambda r: (r["median"], -r["saved"]))["policy"]
    shown = [tuned] + [p for p in plist if p.startswith("CS M") and p.endswith("then best +30")]
    shown = list(dict.fromkeys(shown + [p for p in plist if not p.startswith("CS ")]))
    lines += [
        f"CS policy chosen on {args.tune_setting}, seeds {sorted(tune_seeds)} x data seeds ({len(tune)} runs; "
        f"lowest median regret, then most steps saved, among {len(cs_names)}): **{tuned}**.",
        "",
    ]
    for name, group in [*groups.items(), ("all test runs", runs)]:
        test = [r.name for r in group if r.name not in tune]
        if not test:
            continue
        seeds = sorted({r.head["seed"] for r in group if r.name in test})
        data = sorted({r.head["data_seed"] for r in group})
        lines += [
            f"## {name}: test runs (seeds {seeds} x data seeds {data}, {len(test)} runs)",
            "",
            *table(summarise(res, shown, test)),
            "",
            f"All CS policies on these test runs ({name}):",
            "",
            *table(summarise(res, [tuned] + [p for p in cs_names if p != tuned], test)),
            "",
        ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tables.md").write_text(text + "\n")
        with open(args.out / "runs.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                ["policy", "run", "seed", "data_seed", "setting", "stop", "returned", "oracle", "regret"]
            )
            for p, per in res.items():
                for r in runs:
                    x = per[r.name]
                    w.writerow(
                        [p, r.name, r.head["seed"], r.head["data_seed"], setting(r)]
                        + [x["stop"], x["returned"], x["oracle"], f"{x['regret']:.5f}"]
                    )
    return 0
