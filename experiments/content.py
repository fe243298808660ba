"""What the fine-tuned models draw besides the style: prompt following and style of each run's result.

    python experiments/content.py runs/experiments/rank [--n 48] [--out FILE.md]

For every run of a sweep: N samples of held-out scene prompts "... in <s1><s2> style" (25 DDIM steps,
guidance 5, the same noise for every run), read by the micro feature net: the fraction whose shape,
foreground and background colour match the prompt, and the fraction judged baroque. Content the
prompt did not ask for (a wrong shape or colour) is the micro world's measurable counterpart of the
study's "novel out-of-distribution features" at larger ranks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from dallm.eval.fidelity import micro_fidelity
from dallm.micro import load_feature_net
from dallm.micro.build import eval_prompts, to_tensor
from dallm.micro.compare import generate, load_finetuned
from dallm.micro.teacher import render_teacher
from dallm.report.sweep import load_runs
from dallm.sweep import read_manifest


def measure(job_dir: Path, n: int, net) -> dict[str, float]:
    pipe = load_finetuned(job_dir)
    scenes = eval_prompts(n, 6060)
    images = generate(pipe, [s.caption("<s1><s2>") for s in scenes], seed=6061)
    return micro_fidelity(net, images, scenes)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", type=Path)
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    net = load_feature_net()
    sweep = read_manifest(args.sweep)
    lines = ["| run | params | shape | fg colour | bg colour | judged baroque |", "|---|---|---|---|---|---|"]
    # The ceiling: the feature net reading the teacher's own images of the same scenes.
    scenes = eval_prompts(args.n, 6060)
    rng = np.random.default_rng(6062)
    teacher = to_tensor(np.stack([render_teacher(s, rng) for s in scenes]))
    t = micro_fidelity(net, teacher, scenes)
    lines.append(
        f"| teacher images | - | {t['shape']:.2f} | {t['fg']:.2f} | {t['bg']:.2f} | {t['style']:.2f} |"
    )
    print(lines[-1], flush=True)
    for rd in load_runs(args.sweep, sweep):
        if not (rd.folder / "pytorch_lora_weights.safetensors").is_file():
            continue
        a = measure(rd.folder, args.n, net)
        params = ", ".join(f"{k}={v}" for k, v in rd.run.params.items())
        lines.append(
            f"| {rd.run.name} | {params} | {a['shape']:.2f} | {a['fg']:.2f} | {a['bg']:.2f} | {a['style']:.2f} |"
        )
        print(lines[-1], flush=True)
    text = f"Prompt following of each run's result ({args.n} held-out scenes):\n\n" + "\n".join(lines) + "\n"
    dest = args.out or args.sweep / "report" / "content.md"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
