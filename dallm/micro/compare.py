"""Before/after: the base micro model and a fine-tuned job output, side by side with the teacher.

    python -m dallm.micro.compare JOB_DIR OUT.png [--n 8]

Rows: teacher images ("in baroque style"), base-model samples and fine-tuned samples for the
same scenes and the same noise ("in <s1><s2> style"; the base model gets the prompt without the
learned tokens). Also prints KID (micro features) of each to held-out teacher images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dallm.micro import MODEL_DIR, load_feature_net
from dallm.micro.build import eval_prompts, features, kid, make_teacher, save_grid, to_tensor
from dallm.micro.stages import LATENT
from dallm.micro.teacher import render_teacher


def load_finetuned(job_dir: Path, base: Path = MODEL_DIR):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    for emb in sorted(Path(job_dir).glob("*_emb.safetensors")):
        from safetensors.torch import load_file

        weights = load_file(str(emb))["clip_l"]
        tokens = [f"<s{i + 1}>" for i in range(len(weights))]
        pipe.load_textual_inversion(
            weights, token=tokens, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
    pipe.load_lora_weights(str(job_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int, steps: int = 25, guidance: float = 5.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    lat = torch.randn((len(prompts), 4, LATENT, LATENT), generator=gen)
    return pipe(
        prompts, num_inference_steps=steps, guidance_scale=guidance, latents=lat, output_type="pt"
    ).images


def compare(
    job_dir: Path,
    out_png: Path,
    n: int = 8,
    n_kid: int = 64,
    token: str = "<s1><s2>",
    model: Path = MODEL_DIR,
) -> dict:
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(1)
    base = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    base.set_progress_bar_config(disable=True)
    tuned = load_finetuned(job_dir, model)
    scenes = eval_prompts(max(n, n_kid), 5150)
    rng = np.random.default_rng(5151)
    teacher = to_tensor(np.stack([render_teacher(s, rng) for s in scenes[:n]]))
    before = generate(base, [s.caption() + " in style" for s in scenes], 0)
    after = generate(tuned, [s.caption(token) for s in scenes], 0)
    save_grid(out_png, [teacher, before[:n], after[:n]], scale=4)
    net = load_feature_net()
    ref, _ = make_teacher(200, 5152)
    fr = features(net, to_tensor(ref))
    # Subsets of half the samples: a subset as large as the sample set has no spread at all.
    k_before = kid(features(net, before[:n_kid]), fr, subset_size=n_kid // 2)
    k_after = kid(features(net, after[:n_kid]), fr, subset_size=n_kid // 2)
    style = {
        k: float(net.predict(x[:n_kid])["style"].float().mean())
        for k, x in (("before", before), ("after", after))
    }
    return {
        "kid_before": k_before,  # (mean, std over 100 subsets of n_kid // 2 samples)
        "kid_after": k_after,
        "judged_baroque": style,
        "samples": n_kid,
        "subset_size": n_kid // 2,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("job_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--n-kid", type=int, default=64)
    p.add_argument("--model", type=Path, default=MODEL_DIR)
    a = p.parse_args()
    print(json.dumps(compare(a.job_dir, a.out, a.n, a.n_kid, model=a.model), indent=1))


if __name__ == "__main__":
    main()
