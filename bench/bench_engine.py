"""Engine benchmark: the cost of CS monitoring and of dallm's training step, as ratios measured side
by side in one run (interleaved blocks of steps on the same model, batch and device).

(a) monitoring overhead: dallm's step with CS (Eq. 2) + CS-Fluctuation every step vs monitoring off.
(b) engine overhead: dallm's step (monitoring off) vs a bare diffusers + peft loop written like
    diffusers' train_text_to_image_lora.py, on the same LoRA-wrapped UNet and the same batch.

Shapes: `sd15` is Stable Diffusion 1.5's real UNet / VAE / CLIP ViT-L text encoder built from their
configs (written below) with random weights; `tiny` is the test model; `micro` the shipped one.

    python bench/bench_engine.py --shape tiny --steps 30
    python bench/bench_engine.py --shape sd15 --device cuda --steps 20 --mixed-precision bf16
    python bench/bench_engine.py --shape sd15 --resolution 256 --steps 3      # CPU: slow

Needs torch, diffusers, transformers (peft's dependency), peft and pydantic; run it from the
repository root (no install needed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
try:  # dallm.config writes TOML with tomli_w; the benchmark never does
    import tomli_w  # noqa: F401
except ImportError:
    sys.modules["tomli_w"] = types.ModuleType("tomli_w")

import torch
import torch.nn.functional as F
from sd15 import SD15_UNET  # bench/sd15.py (scripts run from bench/)

SD15_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_TEXT = {  # CLIP ViT-L/14 text tower
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}


def sd15_parts(device: torch.device, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dallm.models import ModelParts
    from dallm.tiny import write_clip_tokenizer

    folder = Path(tempfile.mkdtemp()) / "tokenizer"
    write_clip_tokenizer(folder, max_length=77)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    cfg = dict(SD15_TEXT, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(**SD15_UNET)
    unet.set_attn_processor(AttnProcessor2_0())
    vae = AutoencoderKL(**SD15_VAE)
    sched = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
    )
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
        m.to(device=device) if dtype == torch.float32 else m.to(device=device, dtype=dtype)
    return ModelParts(unet, vae, text_encoder, tokenizer, sched, "sd15-config")


def load(shape: str, device: torch.device, dtype: torch.dtype) -> Any:
    from dallm.config import ModelConfig
    from dallm.models import load_parts

    if shape == "sd15":
        return sd15_parts(device, dtype)
    if shape == "tiny":
        from dallm.tiny import build_tiny_sd

        folder = build_tiny_sd(Path(tempfile.mkdtemp()) / "tiny")
        return load_parts(ModelConfig(base=str(folder)), device=device, weight_dtype=dtype)
    return load_parts(ModelConfig(base="micro"), device=device, weight_dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BareLoop:
    """One step of diffusers' train_text_to_image_lora.py (without accelerate), same model and batch."""

    def __init__(self, parts: Any, pixels: torch.Tensor, ids: torch.Tensor, args: argparse.Namespace) -> None:
        self.p, self.pixels, self.ids, self.args = parts, pixels, ids, args
        self.params = [p for p in parts.unet.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=1e-2)
        self.device = parts.unet.device
        self.dtype = next(parts.vae.parameters()).dtype
        self.autocast = args.mixed_precision != "no" and self.device.type == "cuda"
        self.ac_dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float16

    def step(self) -> float:
        p = self.p
        pixels = self.pixels.to(self.device, self.dtype)
        with torch.no_grad():
            latents = p.vae.encode(pixels).latent_dist.sample().float() * p.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(
            0, p.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=self.device
        )
        noisy = p.noise_scheduler.add_noise(latents, noise, t)
        with torch.autocast(self.device.type, dtype=self.ac_dtype, enabled=self.autocast):
            with torch.no_grad():
                hidden = p.text_encoder(self.ids.to(self.device), return_dict=False)[0]
            pred = p.unet(noisy, t, hidden, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["sd15", "tiny", "micro"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    ap.add_argument("--block", type=int, default=0, help="steps per interleaved block (default: steps // 4)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=0, help="image size (default: the model's)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from dallm.config import config_from_dict
    from dallm.data import ImageSet
    from dallm.early_stop import EarlyStop
    from dallm.metrics_log import MetricsLog
    from dallm.trainer import Trainer

    device = torch.device(args.device)
    mixed = device.type == "cuda" and args.mixed_precision != "no"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision] if mixed else torch.float32
    torch.manual_seed(0)
    t0 = time.perf_counter()
    parts = load(args.shape, device, dtype)
    res = args.resolution or parts.resolution
    print(
        f"model {args.shape}: loaded in {time.perf_counter() - t0:.1f} s; {res}x{res}, batch {args.batch_size}, "
        f"rank {args.rank}, {device}, mixed precision {args.mixed_precision}",
        flush=True,
    )
    n = max(4, args.batch_size)
    pixels = torch.rand(n, 3, res, res) * 2 - 1
    images = ImageSet(
        pixels, ["a red circle in the style of a painting"] * n, [Path(f"{i}.png") for i in range(n)]
    )
    tmp = Path(tempfile.mkdtemp())
    cfg = config_from_dict(
        {
            "data": {"dir": str(tmp)},
            "lora": {"rank": args.rank},
            "train": {
                "steps": 10**6,
                "batch_size": args.batch_size,
                "device": args.device,
                "mixed_precision": args.mixed_precision,
            },
            "monitor": {"window": 10, "early_stop": "notify"},
        }
    )
    trainer = Trainer(cfg, parts, images, None, device)
    watch = EarlyStop(parts.unet, cfg, has_val_kid=False)
    log = MetricsLog(tmp / "metrics.jsonl")
    ids = trainer._token_ids(images.captions[: args.batch_size])
    bare = BareLoop(parts, pixels[: args.batch_size], ids, args)
    lora_params = sum(p.numel() for p in trainer.unet_params)
    print(f"LoRA parameters: {lora_params:,} in {len(watch.cs_fn.pairs)} layers", flush=True)

    step_no, watched = [0], [0]

    def dallm_step(cs: bool) -> None:
        values = trainer.step(step_no[0])
        step_no[0] += 1
        if cs:
            watched[0] += 1  # the detector wants consecutive steps
            r = watch.observe(watched[0], values["lr"])
            values["cs"] = r.cs or 0.0
        log.write(step_no[0], values)

    modes = {
        "bare diffusers+peft": bare.step,
        "dallm, monitoring off": lambda: dallm_step(False),
        "dallm, CS every step": lambda: dallm_step(True),
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    for fn in modes.values():
        for _ in range(args.warmup):
            fn()
    block = args.block or max(1, args.steps // 4)
    order = list(modes)
    while min(len(v) for v in times.values()) < args.steps:
        for name in order:
            for _ in range(block):
                sync(device)
                t = time.perf_counter()
                modes[name]()
                sync(device)
                times[name].append(time.perf_counter() - t)
        order = order[1:] + order[:1]  # rotate, so no mode always follows the same one
    # CS alone, for reference
    cs_times = []
    for _ in range(max(5, args.steps)):
        sync(device)
        t = time.perf_counter()
        watch.cs_fn()
        sync(device)
        cs_times.append(time.perf_counter() - t)

    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"\n{'mode':<24}{'median step':>14}{'steps/s':>10}")
    for m, v in med.items():
        print(f"{m:<24}{v * 1000:>11.2f} ms{1 / v:>10.2f}")
    print(f"{'CS alone':<24}{statistics.median(cs_times) * 1000:>11.3f} ms")
    mon = med["dallm, CS every step"] / med["dallm, monitoring off"] - 1
    eng = med["dallm, monitoring off"] / med["bare diffusers+peft"] - 1
    print(
        f"\n(a) monitoring overhead (CS every step vs off): {100 * mon:+.2f}%  "
        f"[CS alone / step: {100 * statistics.median(cs_times) / med['dallm, monitoring off']:.2f}%]"
    )
    print(f"(b) engine overhead (dallm vs bare diffusers+peft): {100 * eng:+.2f}%")
    log.close()


if __name__ == "__main__":
    main()
