"""The runs of the early-stop experiment as the replay sees them (`load`, `plans`) and the stopping
policies replayed on them, each `Run -> (stop step, returned step)`, with how a returned step is
judged on the fresh references (`judge`). `experiments/es_replay.py` builds the tables from these;
its docstring says what is judged and how.
"""

from __future__ import annotations

import gzip
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import early_stop  # noqa: E402
from early_stop import RULES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "experiments" / "data" / "early_stop"
EVERY = 30


@dataclass
class Run:
    name: str
    group: str
    seed: int
    lr: float
    limit: int
    batch: int
    steps: int  # the planned steps of this replay (a 1,200-step run truncated to 600 has 600)
    start: int
    cs: list[tuple[int, float, float]]
    ev: dict[int, dict]
    full: list[int] = field(default_factory=list)  # steps with fresh-reference scores

    @property
    def epoch(self) -> float:
        return self.limit / self.batch

    def truncated(self, steps: int) -> Run:
        ev = {s: e for s, e in self.ev.items() if s <= steps}
        cs = [x for x in self.cs if x[0] <= steps]
        return Run(
            self.name, self.group, self.seed, self.lr, self.limit, self.batch, steps, self.start, cs, ev
        )

    def __post_init__(self) -> None:
        self.full = sorted(s for s, e in self.ev.items() if "kid_fresh" in e and s > 0)


def load(data: Path) -> list[Run]:
    runs = []
    for path in sorted(data.glob("*/*.json.gz")):
        with gzip.open(path, "rt") as f:
            d = json.load(f)
        cs = [(s, c, lr) for s, c, lr, _ in d["train"] if c is not None]
        ev = {int(s): e for s, e in d["evals"].items()}
        runs.append(
            Run(
                d["name"],
                d["group"],
                d["seed"],
                d["lr"],
                d["limit"],
                d["batch_size"],
                d["steps"],
                d["start_step"],
                cs,
                ev,
            )
        )
    return runs


def plans(runs: list[Run], steps: int = 600) -> list[Run]:
    """The runs as `steps`-step plans (longer runs truncated: their first steps are identical)."""
    return [r.truncated(steps) if r.steps > steps else r for r in runs if r.steps >= steps]


# -- what a policy sees ------------------------------------------------------------------------


def turning(run: Run, window: int, rule: str = "paper") -> tuple[int | None, int | None]:
    """(turning point, seen_at) of the engine's detector, fed after the start step as EarlyStop does."""
    return early_stop.turning(run, window, RULES[rule])  # type: ignore[arg-type]  # same fields


def evaluated_upto(run: Run, stop: int) -> list[int]:
    """Evaluated steps (checkpoints) a policy stopping at `stop` has seen, the base excluded."""
    return sorted(s for s in run.ev if 0 < s <= stop)


def at_or_before(run: Run, step: int) -> int:
    """The last checkpoint at or before `step` (turning points off the checkpoint grid)."""
    return max([s for s in run.ev if 0 < s <= step] or [min(s for s in run.ev if s > 0)])


def stop_at(run: Run, step: float) -> int:
    """A stop at `step`, on the checkpoint grid (a stop is where the weights were saved)."""
    return min(run.steps, max(EVERY, EVERY * round(step / EVERY)))


def window_steps(run: Run, kind: str, value: float) -> int:
    """M in steps as the engine resolves it (`dallm.monitor.window`: an epoch is ceil(items / batch))."""
    from dallm.monitor.window import span_steps, steps_per_epoch

    span = {"steps": int(value), "epochs": f"{value:g} epochs", "fraction": float(value)}[kind]
    return span_steps(span, run.steps, 2, steps_per_epoch(run.limit, run.batch))


Policy = Callable[[Run], tuple[int, int]]  # -> (stop step, returned step)


def csf_alone(kind: str, value: float, rule: str = "paper") -> Policy:
    """Stop when the turning point is confirmed, return its weights (no validation set needed)."""

    def f(run: Run) -> tuple[int, int]:
        tp, seen = turning(run, window_steps(run, kind, value), rule)
        if seen is None:
            return run.steps, run.steps
        return seen, at_or_before(run, tp)

    return f


def lowest(run: Run, steps: list[int], key: str) -> int:
    return min(steps, key=lambda s: (run.ev[s][key], s))


def fidelity(run: Run, step: int, which: str = "fid_choose") -> float:
    """Prompt fidelity: the mean of shape / fg / bg as prompted (dallm.eval.fidelity's `fidelity`)."""
    f = run.ev[step][which]
    return (f["shape"] + f["fg"] + f["bg"]) / 3


def guarded(run: Run, steps: list[int], fid_margin: float | None) -> list[int]:
    """Steps whose prompt fidelity (choose prompt set) stays within `fid_margin` of the base's."""
    if fid_margin is None:
        return steps
    base = fidelity(run, 0)
    ok = [s for s in steps if fidelity(run, s) >= base - fid_margin - 1e-9]
    if ok:
        return ok
    best = max(fidelity(run, s) for s in steps)  # none passes: the most faithful
    return [s for s in steps if fidelity(run, s) == best]


def select(
    kind: str, value: float, margin: float, fid_margin: float | None, key: str = "kid_val_a"
) -> Policy:
    """Stop `margin` steps after the turning point's confirmation (at the
    end without one); return the lowest `key` among evaluated steps whose fidelity passes the guard."""

    def f(run: Run) -> tuple[int, int]:
        tp, seen = turning(run, window_steps(run, kind, value))
        stop = run.steps if seen is None else stop_at(run, seen + margin)
        steps = guarded(run, evaluated_upto(run, stop), fid_margin)
        return stop, lowest(run, steps, key)

    return f


def evidence_select(kind: str, value: float, margin: float, fid_margin: float | None) -> Policy:
    """The rule the engine's `select_checkpoint` had when these runs were replayed: lowest validation
    KID on half a of the held-out images among checkpoints whose fidelity (choose prompts) is within
    `fid_margin` of the base's, then the EARLIEST eligible one whose paired 95% interval to it
    includes 0. The engine dropped that last preference on this evidence (it now returns the lowest,
    the "lowest val KID" rows); it is kept here so the tables re-derive."""
    from dallm.monitor.selection import Evidence, select_checkpoint

    def f(run: Run) -> tuple[int, int]:
        tp, seen = turning(run, window_steps(run, kind, value))
        stop = run.steps if seen is None else stop_at(run, seen + margin)
        steps = evaluated_upto(run, stop)
        recs = [
            Evidence(
                s,
                kid=run.ev[s]["kid_val_a"],
                kid_std=float(np.std(run.ev[s]["kid_val_a_boot"], ddof=1)),
                kid_report=run.ev[s]["kid_val_b"],
                val_loss=run.ev[s]["val_loss"],
                fidelity=fidelity(run, s),
            )
            for s in steps
        ]

        def paired_a(a: int, b: int) -> tuple[float, float, float]:
            d = np.asarray(run.ev[a]["kid_val_a_boot"]) - np.asarray(run.ev[b]["kid_val_a_boot"])
            lo, hi = np.quantile(d, [0.025, 0.975])
            return run.ev[a]["kid_val_a"] - run.ev[b]["kid_val_a"], float(lo), float(hi)

        guard = fidelity(run, 0) if fid_margin is not None else None  # None: the guard is off
        sel = select_checkpoint(recs, guard, fid_margin or 0.0, paired_a, tp)
        if not sel.signal.startswith("val KID"):
            return stop, sel.step  # a fallback (no eligible checkpoint): no paired preference applies
        earlier = [s for s in sel.eligible if s == sel.step or paired_a(s, sel.step)[1] <= 0]
        return stop, min(earlier)

    return f


def fixed(frac: float, ret: str, fid_margin: float | None = None) -> Policy:
    """Stop at `frac` of the planned steps; return its weights ("last") or the best val KID so far."""

    def f(run: Run) -> tuple[int, int]:
        stop = stop_at(run, frac * run.steps)
        if ret == "last":
            return stop, stop
        return stop, lowest(run, guarded(run, evaluated_upto(run, stop), fid_margin), "kid_val")

    return f


def patience(key: str, n: int) -> Policy:
    """Stop after `n` evaluations without a new lowest `key`; return the step of the lowest."""

    def f(run: Run) -> tuple[int, int]:
        best, since = None, 0
        for s in evaluated_upto(run, run.steps):
            if best is None or run.ev[s][key] < run.ev[best][key]:
                best, since = s, 0
            else:
                since += 1
                if since >= n:
                    return s, best
        return run.steps, best

    return f


def to_end(ret: str) -> Policy:
    def f(run: Run) -> tuple[int, int]:
        if ret == "last":
            return run.steps, run.steps
        return run.steps, lowest(run, evaluated_upto(run, run.steps), "kid_val")

    return f


# -- judged on fresh references ----------------------------------------------------------------

# What a returned step is judged on: the fresh references (test seeds), or, for tuning, the validation
# KID against the half of the held-out images no policy chooses on (tune runs are not scored on the
# fresh references, which stay unused until the test report).
JUDGE = {"fresh": "kid_fresh", "val_b": "kid_val_b"}


def judged_steps(run: Run, on: str) -> list[int]:
    return sorted(s for s, e in run.ev.items() if s > 0 and JUDGE[on] in e)


def paired(run: Run, a: int, b: int, on: str = "fresh") -> tuple[float, float]:
    """KID(a) - KID(b) on the judging references and its paired bootstrap std."""
    key = JUDGE[on]
    ea, eb = run.ev[a], run.ev[b]
    d = np.asarray(ea[key + "_boot"]) - np.asarray(eb[key + "_boot"])
    return ea[key] - eb[key], float(d.std(ddof=1)) if a != b else 0.0


def best_of(run: Run, on: str = "fresh") -> int:
    return min(judged_steps(run, on), key=lambda s: run.ev[s][JUDGE[on]])


@dataclass
class Outcome:
    stop: int
    returned: int
    regret: float | None  # KID(returned) - KID(best) on the judging references; None: not scored there
    se: float | None
    saved: float
    fid: dict[str, float] | None

    @property
    def within(self) -> bool | None:
        return None if self.regret is None else self.regret <= (self.se or 0.0) + 1e-12


def judge(run: Run, policy: Policy, on: str = "fresh") -> Outcome:
    stop, ret = policy(run)
    saved = 1 - stop / run.steps
    if ret not in judged_steps(run, on):
        return Outcome(stop, ret, None, None, saved, None)
    regret, se = paired(run, ret, best_of(run, on), on)
    return Outcome(
        stop, ret, regret, se, saved, run.ev[ret].get("fid_report") or run.ev[ret].get("fid_choose")
    )
