"""Rebuild the micro world's artefacts from fixed seeds: `dallm micro build`.

Steps (each seeded):
1. Data: world scenes (plain style) and teacher scenes (baroque style), rendered at 32x32.
2. VAE (AutoencoderKL, 32x32 -> 4x8x8), trained on world and teacher images, so that the teacher's
   look is representable in latent space (as a real model's VAE represents a larger model's images).
3. Text encoder (CLIPTextModel, from scratch) and UNet2DConditionModel, trained jointly on the world
   only: the model never sees the teacher's style. v-prediction on a zero-terminal-SNR schedule
   (the prototype's colour failure: on SD's schedule the last noise level still carries the image
   mean, so the model reads the colours from the noise rather than from the prompt), 10% empty
   captions (classifier-free guidance needs a trained unconditional branch), EMA weights.
4. Feature net: a CNN predicting shape, colours and style of world and teacher images (and of their
   VAE reconstructions, so it also reads model samples); its penultimate layer is the KID feature.
5. Quality figures (the feature net reads base-model samples) and MANIFEST.json with sha256 of
   every file.

The models and training loops are in `dallm.micro.stages`. At `steps_scale=1` everything runs on
the CPU in about 20 minutes on 2 idle cores (1226 s measured), faster on a GPU.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dallm.build_manifest import device_name, versions, write_manifest
from dallm.eval.fidelity import prompt_following  # the library's measure, used here and by experiments
from dallm.image.tiny import save_sd_pipeline
from dallm.micro import featnet as featnet_mod
from dallm.micro.stages import (
    LATENT,
    MAX_TOKENS,
    encode,
    make_scheduler_config,
    make_text_encoder,
    make_unet,
    make_vae,
    reconstruct,
    train_featnet,
    train_unet,
    train_vae,
    write_tokenizer,
)
from dallm.micro.teacher import render_teacher
from dallm.micro.world import Scene, render, sample_scene


@dataclass
class Steps:
    vae: int = 600
    unet: int = 2400
    featnet: int = 800
    vae_batch: int = 32
    unet_batch: int = 48
    featnet_batch: int = 128
    world_images: int = 12000
    teacher_images: int = 3000

    def scaled(self, f: float) -> Steps:
        s = copy.copy(self)
        s.vae = max(2, round(self.vae * f))
        s.unet = max(2, round(self.unet * f))
        s.featnet = max(2, round(self.featnet * f))
        s.world_images = max(64, round(self.world_images * min(1.0, f * 4)))
        s.teacher_images = max(64, round(self.teacher_images * min(1.0, f * 4)))
        return s


@dataclass
class EvalSizes:
    prompt_samples: int = 64  # base-model samples for prompt following and KID
    style_images: int = 400  # held-out images per class for the style accuracy
    teacher_ref: int = 200  # held-out teacher images (KID reference)
    steps: int = 25
    guidance: float = 5.0
    subset_size: int = 50
    num_subsets: int = 100


# ----------------------------------------------------------------------------------------------
# Data


def caption_with_style(scene: Scene, rng: np.random.Generator) -> str:
    """The base model's training captions: 10% empty (for CFG), else the caption, 30% "in plain style"."""
    u = rng.random()
    if u < 0.1:
        return ""
    return scene.caption("plain") if u < 0.4 else scene.caption()


def make_world(n: int, seed: int) -> tuple[np.ndarray, list[Scene]]:
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    return np.stack([render(s) for s in scenes]), scenes


def make_teacher(n: int, seed: int) -> tuple[np.ndarray, list[Scene]]:
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    return np.stack([render_teacher(s, rng) for s in scenes]), scenes


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float [N,3,H,W] in [0,1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)


def labels(scenes: list[Scene], style: int) -> torch.Tensor:
    return torch.tensor([(*s.labels(), style) for s in scenes], dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# Evaluation


def kid(
    feats_a: torch.Tensor, feats_b: torch.Tensor, subset_size: int = 50, num_subsets: int = 100, seed: int = 0
):
    """KID (unbiased MMD^2, cubic kernel (x.y/d + 1)^3): mean and std over random subsets."""
    try:
        from dallm.eval.kid import kid as project_kid  # the project's implementation, once it exists
    except ImportError:
        project_kid = None
    if project_kid is not None:
        mean, std = project_kid(feats_a, feats_b, subset_size=subset_size, num_subsets=num_subsets, seed=seed)
        return float(mean), float(std)
    a = torch.as_tensor(feats_a, dtype=torch.float64)
    b = torch.as_tensor(feats_b, dtype=torch.float64)
    m = min(subset_size, len(a), len(b))
    d = a.shape[1]
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(num_subsets):
        x = a[torch.randperm(len(a), generator=g)[:m]]
        y = b[torch.randperm(len(b), generator=g)[:m]]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
        mmd += (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        mmd -= 2 * kxy.mean()
        vals.append(float(mmd))
    return float(np.mean(vals)), float(np.std(vals))


def eval_prompts(n: int, seed: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


@torch.no_grad()
def sample(pipe, prompts: list[str], steps: int, guidance: float, seed: int, batch: int = 64) -> torch.Tensor:
    """Images [N,3,H,W] in [0,1]; one generator seeded once, noise drawn on the CPU."""
    out = []
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        lat = torch.randn((len(chunk), 4, LATENT, LATENT), generator=gen)
        img = pipe(
            chunk,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=lat.to(pipe.device),
            output_type="pt",
        ).images
        out.append(img.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def features(net, images: torch.Tensor, bs: int = 512) -> torch.Tensor:
    dev = next(net.parameters()).device
    return torch.cat([net(images[i : i + bs].to(dev)).cpu() for i in range(0, len(images), bs)])


def evaluate(pipe, net, sizes: EvalSizes, seed: int, log=print) -> dict:
    """The quality figures of the issue, measured by the feature net."""
    q: dict = {"steps": sizes.steps, "guidance": sizes.guidance, "samples": sizes.prompt_samples}
    scenes = eval_prompts(sizes.prompt_samples, seed + 100)
    base = sample(pipe, [s.caption() for s in scenes], sizes.steps, sizes.guidance, seed + 101)
    q["prompt_following"] = prompt_following(net, base, scenes)
    baroque_prompted = sample(
        pipe, [s.caption("baroque") for s in scenes], sizes.steps, sizes.guidance, seed + 102
    )
    q["prompt_following_baroque_prompts"] = prompt_following(net, baroque_prompted, scenes)
    pred = net.predict(baroque_prompted.to(next(net.parameters()).device))
    q["base_baroque_prompts_judged_baroque"] = float(pred["style"].float().mean())
    # Style accuracy on held-out world and teacher images.
    w, _ = make_world(sizes.style_images, seed + 200)
    t, _ = make_teacher(sizes.style_images, seed + 201)
    pw = net.predict(to_tensor(w).to(next(net.parameters()).device))["style"].cpu()
    pt = net.predict(to_tensor(t).to(next(net.parameters()).device))["style"].cpu()
    q["style_accuracy"] = float(torch.cat([pw == 0, pt == 1]).float().mean())
    # KID: base samples vs teacher, teacher split A vs split B, base vs world.
    ta, _ = make_teacher(sizes.teacher_ref, seed + 300)
    tb, _ = make_teacher(sizes.teacher_ref, seed + 301)
    wr, _ = make_world(sizes.teacher_ref, seed + 302)
    fa, fb = features(net, to_tensor(ta)), features(net, to_tensor(tb))
    fw, fbase = features(net, to_tensor(wr)), features(net, base)
    kw = dict(subset_size=sizes.subset_size, num_subsets=sizes.num_subsets, seed=seed)
    k_base_teacher = kid(fbase, fa, **kw)
    k_teacher = kid(fa, fb, **kw)
    k_base_world = kid(fbase, fw, **kw)
    q["kid"] = {
        "base_vs_teacher": k_base_teacher,
        "teacher_a_vs_b": k_teacher,
        "base_vs_world": k_base_world,
        "subset_size": min(sizes.subset_size, sizes.prompt_samples),
        "num_subsets": sizes.num_subsets,
    }
    q["kid_ratio_base_teacher_over_teacher_split"] = k_base_teacher[0] / max(abs(k_teacher[0]), 1e-6)
    q["_images"] = {"base": base, "baroque_prompted": baroque_prompted}
    return q


# ----------------------------------------------------------------------------------------------
# The build


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build(
    out: Path,
    steps_scale: float = 1.0,
    device: str = "auto",
    seed: int = 0,
    eval_sizes: EvalSizes | None = None,
    command: str | None = None,
    log: Callable[[str], None] = print,
    grid: Path | None = None,
    unet_channels: tuple[int, int] = (48, 96),
    threads: int | None = None,
) -> dict:
    """Build model/, featnet.safetensors (+ .json) and MANIFEST.json into `out`; return the manifest."""
    import diffusers
    import transformers
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    t_start = time.perf_counter()
    if threads:
        # None: torch's default (every core). On an idle 2-core box 2 threads make a UNet step 1.7x
        # faster than 1 (0.35 vs 0.60 s); on a CPU busy with other work OpenMP's spinning threads
        # made a VAE step 12 times slower with 2 threads than with 1: pass threads=1 there.
        torch.set_num_threads(threads)
    dev = pick_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps().scaled(steps_scale)
    sizes = eval_sizes or EvalSizes()
    seconds: dict[str, float] = {}
    figures: dict = {}

    def stage(name: str, t0: float) -> None:
        seconds[name] = round(time.perf_counter() - t0, 1)
        log(f"{name}: {seconds[name]} s")

    # 1. data
    t0 = time.perf_counter()
    world, world_scenes = make_world(steps.world_images, seed + 1)
    teacher, teacher_scenes = make_teacher(steps.teacher_images, seed + 2)
    world_t, teacher_t = to_tensor(world), to_tensor(teacher)
    stage("data", t0)

    # 2. VAE
    t0 = time.perf_counter()
    torch.manual_seed(seed + 10)
    gen = torch.Generator().manual_seed(seed + 11)
    vae = make_vae()
    vae_data = torch.cat([world_t[: max(len(teacher_t), len(world_t) // 2)], teacher_t])
    figures["vae_loss"] = train_vae(vae, vae_data, steps.vae, steps.vae_batch, dev, gen, log)
    mu, sd = encode(vae, world_t, dev)
    scale = float(1.0 / (mu + sd * torch.randn(mu.shape, generator=gen)).std())
    vae.register_to_config(scaling_factor=scale)
    figures["vae_scaling_factor"] = scale
    rec = reconstruct(vae, world_t[:256], dev)
    figures["vae_recon_mse_world"] = float(F.mse_loss(rec, world_t[:256]))
    rec_t = reconstruct(vae, teacher_t[:256], dev)
    figures["vae_recon_mse_teacher"] = float(F.mse_loss(rec_t, teacher_t[:256]))
    stage("vae", t0)

    # 3. tokenizer, text encoder, UNet
    t0 = time.perf_counter()
    tmp_tok = out / "_tokenizer"
    write_tokenizer(tmp_tok)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_tok)
    shutil.rmtree(tmp_tok)
    cap_rng = np.random.default_rng(seed + 20)
    captions = [caption_with_style(s, cap_rng) for s in world_scenes]
    ids = tokenizer(
        captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    torch.manual_seed(seed + 21)
    text_encoder = make_text_encoder(len(tokenizer), tokenizer)
    unet = make_unet(unet_channels)
    sched_cfg = make_scheduler_config()
    scheduler = DDIMScheduler(**sched_cfg)
    gen = torch.Generator().manual_seed(seed + 22)
    loss_avg, _ = train_unet(
        unet, text_encoder, scheduler, mu, sd, scale, ids, steps.unet, steps.unet_batch, dev, gen, log
    )
    figures["unet_loss"] = loss_avg
    stage("unet", t0)

    # Save the pipeline (CPU, float32).
    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    save_sd_pipeline(model_dir, unet.cpu(), vae.cpu(), text_encoder.cpu(), tokenizer, scheduler)

    # 4. feature net
    t0 = time.perf_counter()
    n_rec = min(len(world_t), 4000)
    rec_w = reconstruct(vae.to(dev), world_t[:n_rec], dev)
    rec_t = reconstruct(vae, teacher_t, dev)
    torch.manual_seed(seed + 30)
    net = featnet_mod.FeatureNet(width=16)
    gen = torch.Generator().manual_seed(seed + 31)
    images = torch.cat([world_t, teacher_t])
    targets = torch.cat([labels(world_scenes, 0), labels(teacher_scenes, 1)])
    rec_images = torch.cat([rec_w, rec_t])
    rec_targets = torch.cat([labels(world_scenes[:n_rec], 0), labels(teacher_scenes, 1)])
    figures["featnet_loss"] = train_featnet(
        net, images, targets, rec_images, rec_targets, steps.featnet, steps.featnet_batch, dev, gen, log
    )
    net = net.cpu()
    featnet_mod.save(net, out / "featnet.safetensors")
    stage("featnet", t0)

    # 5. quality, from the saved files
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True).to(dev)
    pipe.set_progress_bar_config(disable=True)
    net = featnet_mod.load(out / "featnet.safetensors", dev)
    q = evaluate(pipe, net, sizes, seed, log)
    images_q = q.pop("_images")
    figures.update(q)
    stage("eval", t0)
    if grid is not None:
        save_grid(grid, [images_q["base"][:16], images_q["baroque_prompted"][:16]])

    seconds["total"] = round(time.perf_counter() - t_start, 1)
    manifest = write_manifest(out, {
        "build_command": command or f"dallm micro build --steps-scale {steps_scale} --device {device}",
        "seed": seed,
        "steps_scale": steps_scale,
        "steps": asdict(steps),
        "unet_channels": list(unet_channels),
        "eval": asdict(sizes),
        "seconds": seconds,
        "device": device_name(dev),
        "threads": torch.get_num_threads(),
        "versions": versions(diffusers, transformers),
        "quality": figures,
    })  # fmt: skip
    log(json.dumps({k: manifest[k] for k in ("seconds", "quality", "total_bytes")}, indent=1))
    return manifest


def save_grid(path: Path, rows: list[torch.Tensor], scale: int = 3) -> None:
    """Rows of images [N,3,H,W] in [0,1] as one PNG (nearest-neighbour upscaled)."""
    from PIL import Image

    arr = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)
    img = (arr.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST).save(path)


def write_quickstart_data(
    root: Path, n_train: int = 20, n_val: int = 20, seed: int = 1234, token: str = "<s1><s2>"
):
    """Teacher images for the quickstart: train/ and val/ PNGs with captions "... in <s1><s2> style"."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        folder = Path(root) / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            scene = sample_scene(rng)
            Image.fromarray(render_teacher(scene, rng)).save(folder / f"{split}{i:03d}.png")
            (folder / f"{split}{i:03d}.txt").write_text(scene.caption(token) + "\n")


if __name__ == "__main__":  # python -m dallm.micro.build OUT [STEPS_SCALE] [DEVICE]
    a = sys.argv[1:]
    build(Path(a[0]), float(a[1]) if len(a) > 1 else 1.0, a[2] if len(a) > 2 else "auto")
