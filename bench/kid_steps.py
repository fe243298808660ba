"""Does the KID of a job's weights depend on the DDIM steps of its eval samples (eval.steps)?

    .venv/bin/python bench/kid_steps.py CHECKPOINT [--config configs/quickstart.toml]
        [--val DIR] [--images 40] [--steps 10 25]

Loads the job's model with the LoRA and token rows of CHECKPOINT (a checkpoint folder of a job run
from --config), makes --images eval images with the job's eval prompts and noise at each --steps
(the same images but for the sampler), and prints the validation KID +- std (subsets of half the
images) at each, and the difference between them in units of the std. The reference is --val
(default: the config's eval.val_dir); a bigger held-out set than the 20 shipped ones
(`dallm.micro.build.write_quickstart_data(ROOT, n_val=200)` makes 200, the first 20 the shipped ones)
keeps the reference side from dominating the spread.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from dallm.config import load_config
from dallm.engine.checkpoint import load_checkpoint
from dallm.engine.lora import add_lora
from dallm.eval.background import _load_weights
from dallm.eval.inputs import target_images
from dallm.eval.kid import kid
from dallm.eval.live import LiveEvaluator
from dallm.image.data import load_training_data
from dallm.image.models import load_parts, read_resolution, resolve_base
from dallm.image.tokens import add_tokens

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.toml")
    p.add_argument("--val", type=Path, default=None)
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25])
    a = p.parse_args()
    torch.set_num_threads(1)  # a shared box: one core
    cfg = load_config(a.config)
    cfg.eval.num_images = a.images
    cfg.eval.val_dir = a.val or cfg.eval.val_dir
    cfg.eval.cache = False  # the teacher's features are quick; leave the shared cache alone
    parts = load_parts(cfg.model)
    if cfg.tokens.new or cfg.lora.text_encoder:
        parts.text_encoder.to(torch.float32)
    tokens = add_tokens(parts.tokenizer, parts.text_encoder, cfg.tokens, torch.Generator())
    add_lora(parts.unet, parts.text_encoder, cfg.lora)
    _load_weights(parts, tokens, load_checkpoint(a.checkpoint))
    resolution = cfg.model.resolution or read_resolution(resolve_base(cfg.model.base), cfg.model.revision)
    images, _ = load_training_data(cfg.data, resolution)
    assert cfg.eval.val_dir is not None, "the config has no eval.val_dir and --val is not given"
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for steps in a.steps:
            cfg.eval.steps = steps
            ev = LiveEvaluator(cfg, parts, Path(tmp), lambda e: None, torch.device("cpu"), torch.float32,
                               images.captions)  # fmt: skip
            ref = ev._target_features(target_images(cfg.eval.val_dir, "eval.val_dir"))
            feats = ev._generated_features(ev.eval_prompts, base=False)
            out[steps] = kid(feats, ref, subset_size=a.images // 2, num_subsets=100, seed=cfg.seed)
            print(f"eval.steps {steps:3d}: kid_val {out[steps][0]:.4f} +- {out[steps][1]:.4f} "
                  f"({a.images} images vs {len(ref)}, subsets of {a.images // 2})", flush=True)  # fmt: skip
    lo, hi = a.steps[0], a.steps[-1]
    diff = out[hi][0] - out[lo][0]
    print(f"difference {hi} - {lo} steps: {diff:+.4f} = {diff / max(out[lo][1], out[hi][1]):+.2f} std")


if __name__ == "__main__":
    main()
