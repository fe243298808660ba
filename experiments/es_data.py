"""Summarise scored early-stopping runs into the compact raw logs that are committed (issue 23).

    python experiments/es_data.py [--runs runs/experiments/es] [--out experiments/data/early_stop]

One `<group>/<name>.json.gz` per finished, scored run (`es_record.py`, `es_score.py`), holding:

- the run: seed, lr, data.limit, planned steps, the detector's start step;
- `train`: [step, cs, lr, loss] at every step (from metrics.jsonl);
- `evals`: per scored step (0 = the base model):
  - `kid_val` (50 samples of the training captions vs the 100 held-out images, the unbiased KID of
    all of them), `kid_val_std` (its std of the mean: bootstrap over samples and references,
    `dallm.eval.kid_spread`), `kid_val_a` / `kid_val_b` (against the two halves of
    `split_references(100)`: choose on a, report on b), `kid_val_boot` / `kid_val_a_boot` /
    `kid_val_b_boot` (bootstrap replicates against all references / half a / half b);
  - `val_loss` (mean noise-prediction MSE over 100 held-out images x 5 fixed timesteps, fixed
    noise), `val_loss_std` (std of that mean over images), `val_loss_img` (per image, for paired
    differences);
  - `fid_choose` / `fid_report`: the fraction of the 32 held-out scene prompts whose shape / fg / bg
    the feature net reads as prompted, and the fraction judged in the teacher's style;
  - where scored in full: `kid_fresh` (60 samples from 3 noise seeds never used for choosing vs 200
    fresh teacher images), `kid_fresh_seed` (each seed's 20 alone), `kid_fresh_boot`.
  The `_boot` lists are `N_BOOT` bootstrap replicates whose resampling (reference indices, sample
  indices: row i has the same prompt and noise at every step) is the same at every step of a run, so
  replicate b of step s minus replicate b of step t is a paired replicate of KID(s) - KID(t).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from es_record import DATA, FRESH, OUT, plans  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / "experiments" / "data" / "early_stop"
N_BOOT = 200
BOOT_SEED = 23


def ref_features(folder: Path) -> torch.Tensor:
    from es_score import teacher_folder

    from dallm.micro import load_feature_net

    pixels, _ = teacher_folder(folder)
    with torch.no_grad():
        return load_feature_net()(pixels).double()


class Kid:
    """KID against one reference set with bootstrap counts fixed once (paired across steps)."""

    def __init__(self, refs: torch.Tensor, n_samples: int) -> None:
        from dallm.eval.kid import polynomial_kernel
        from dallm.eval.kid_spread import _counts

        self.refs = refs
        self.kyy = polynomial_kernel(refs, refs)
        gen = torch.Generator().manual_seed(BOOT_SEED)
        self.cx, self.cy = _counts(n_samples, N_BOOT, gen), _counts(len(refs), N_BOOT, gen)

    def __call__(self, x: torch.Tensor, cols: np.ndarray | None = None) -> tuple[float, list[float]]:
        # The replicate helpers of dallm.eval.kid_spread (private there): shared counts are what make
        # the replicates paired across steps, which its public functions do per call.
        from dallm.eval.kid import polynomial_kernel
        from dallm.eval.kid_spread import _counts, _replicates

        x = x.double()
        kxx = polynomial_kernel(x, x)
        if cols is not None:
            y = self.refs[cols]
            one = _replicates(
                kxx, polynomial_kernel(y, y), polynomial_kernel(x, y), *self._ones(len(x), len(y))
            )
            return float(one[0]), []
        kxy = polynomial_kernel(x, self.refs)
        point = float(
            _replicates(kxx, self.kyy, kxy, _counts(len(x), 1, None), _counts(len(self.refs), 1, None))[0]
        )
        reps = _replicates(kxx, self.kyy, kxy, self.cx, self.cy).numpy()
        return point, [round(float(v), 5) for v in reps]

    @staticmethod
    def _ones(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        from dallm.eval.kid_spread import _counts

        return _counts(n, 1, None), _counts(m, 1, None)


def rates(t: torch.Tensor) -> dict[str, float]:
    """[N, 7] (predicted shape fg bg style | asked shape fg bg) -> fractions as prompted / in style."""
    out = {k: float((t[:, i] == t[:, 4 + i]).float().mean()) for i, k in enumerate(("shape", "fg", "bg"))}
    out["style"] = float((t[:, 3] == 1).float().mean())  # style 1 = the teacher's (world.STYLES)
    out["fidelity"] = (out["shape"] + out["fg"] + out["bg"]) / 3  # as dallm.eval.fidelity.micro_fidelity
    return {k: round(v, 4) for k, v in out.items()}


def summarise(folder: Path, val: torch.Tensor, fresh: torch.Tensor) -> dict:
    import tomllib

    from dallm.eval.kid_spread import split_references

    cfg = tomllib.loads((folder / "config.toml").read_text())
    start = cfg["monitor"].get("start_step")
    if start is None:
        start = max(cfg["tokens"].get("ti_steps", 0), cfg["train"].get("warmup_steps", 0))
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [[r["step"], r.get("cs"), r.get("lr"), r.get("loss")] for r in rows if "loss" in r]
    half_a, half_b = split_references(len(val), 0)
    kv, kfs = Kid(val, 50), {}  # fresh: one per sample count (60; tune s0 has 90 and 120)
    ka, kb = Kid(val[half_a], 50), Kid(val[half_b], 50)
    evals: dict[str, dict] = {}
    for path in sorted((folder / "scores").glob("step-*.pt")):
        step = int(path.stem.split("-")[1])
        d = torch.load(path, weights_only=True)
        e: dict = {}
        e["kid_val"], e["kid_val_boot"] = kv(d["val"])
        e["kid_val_std"] = round(float(np.std(e["kid_val_boot"], ddof=1)), 5)
        e["kid_val_a"], e["kid_val_a_boot"] = ka(d["val"])
        e["kid_val_b"], e["kid_val_b_boot"] = kb(d["val"])
        vl = d["val_loss"].double().mean(1)
        e["val_loss"] = float(vl.mean())
        e["val_loss_std"] = float(vl.std() / len(vl) ** 0.5)
        e["val_loss_img"] = [round(float(v), 5) for v in vl]
        e["fid_choose"] = rates(d["fid_choose"])
        if "fid_report" in d:
            e["fid_report"] = rates(d["fid_report"])
        if "fresh" in d:
            f = d["fresh"]
            kf = kfs.setdefault(f.shape[0] * f.shape[1], Kid(fresh, f.shape[0] * f.shape[1]))
            e["kid_fresh"], e["kid_fresh_boot"] = kf(f.reshape(-1, f.shape[-1]))
            e["kid_fresh_seed"] = [kf(f[k], np.arange(len(fresh)))[0] for k in range(len(f))]
        evals[str(step)] = e
    info = json.loads((folder / "result.json").read_text())
    return {
        "name": folder.name,
        "group": folder.parent.name,
        "seed": int(cfg.get("seed", 0)),
        "lr": float(cfg["train"]["lr"]),
        "limit": int(cfg["data"].get("limit") or 0),
        "batch_size": int(cfg["train"]["batch_size"]),
        "steps": int(cfg["train"]["steps"]),
        "start_step": int(start),
        "result": info,
        "train": train,
        "evals": evals,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=OUT)
    ap.add_argument("--out", type=Path, default=DEST)
    ap.add_argument("--force", action="store_true", help="rewrite files that exist")
    a = ap.parse_args()
    torch.set_num_threads(1)
    val, fresh = ref_features(DATA / "val"), ref_features(FRESH / "val")
    n = 0
    for p in plans():
        folder = a.runs / p.group / p.name
        dest = a.out / p.group / f"{p.name}.json.gz"
        if not (folder / "scores" / "done").is_file() or (dest.is_file() and not a.force):
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".tmp")
        with gzip.open(tmp, "wt") as f:
            json.dump(summarise(folder, val, fresh), f, separators=(",", ":"))
        tmp.rename(dest)
        n += 1
        print(dest, flush=True)
    print(f"{n} run(s) written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
