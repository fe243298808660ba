"""Engine benchmark: dallm's training step against a bare diffusers + peft loop, the cost of CS
monitoring, and the engine options, as ratios measured side by side in one run (interleaved blocks
of steps on the same model, batch and device), for each batch size of a sweep.

Per batch size: (1) a bare loop written like diffusers' train_text_to_image_lora.py, (2) dallm's
step with monitoring off, (3) dallm with CS (Eq. 2) + CS-Fluctuation every step (on CUDA also with
the CS in a CUDA graph), and, for each option given (--compile, --channels-last, --mixed-precision),
dallm (monitoring off) on its own model copy with that option off, so each option's ratio comes
from the same run. FLOPs per step are counted once per batch size with torch's FlopCounterMode
(forward and backward of the LoRA step); achieved TFLOP/s = FLOPs / median step time, and MFU
against the device's peak (bench/gpu_peaks.py). One markdown table is printed (and written to
--out, or to $OUT/bench_engine.md when $OUT is set) after each batch size.

Shapes: `sd15` is Stable Diffusion 1.5's real UNet / VAE / CLIP ViT-L text encoder built from their
configs (written below) with random weights; `tiny` is the test model; `micro` the shipped one.

    python bench/bench_engine.py --shape tiny --steps 20 --batch-sizes 1,4,8 --channels-last
    python bench/bench_engine.py --shape sd15 --device cuda --batch-sizes 1,4,8 --mixed-precision bf16
    bench/gpu_check.sh          # the whole GPU sweep at SD 1.5 shape, one command

Needs torch, diffusers, transformers (peft's dependency), peft and pydantic; run it from the
repository root (no install needed).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
try:  # dallm.config writes TOML with tomli_w; the benchmark never does
    import tomli_w  # noqa: F401
except ImportError:
    sys.modules["tomli_w"] = types.ModuleType("tomli_w")

import torch
import torch.nn.functional as F
from gpu_peaks import count_flops, device_name, mfu_text  # bench/ (scripts run from bench/)
from sd15 import SD15_UNET

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

    from dallm.image.models import ModelParts
    from dallm.image.tiny import write_clip_tokenizer

    folder = Path(tempfile.mkdtemp()) / "tokenizer"
    write_clip_tokenizer(folder, max_length=77)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    cfg = dict(SD15_TEXT, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg, pad_token_id=tokenizer.pad_token_id))
    with torch.device(device):  # random init on the device: seconds instead of a minute on CPU
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
    unet.set_attn_processor(AttnProcessor2_0())
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
    from dallm.image.models import load_parts

    if shape == "sd15":
        return sd15_parts(device, dtype)
    if shape == "tiny":
        from dallm.image.tiny import build_tiny_sd

        folder = build_tiny_sd(Path(tempfile.mkdtemp()) / "tiny")
        return load_parts(ModelConfig(base=str(folder)), device=device, weight_dtype=dtype)
    return load_parts(ModelConfig(base="micro"), device=device, weight_dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Variant:
    """Engine options of one model copy."""

    precision: str  # "no" (fp32), "bf16", "fp16": frozen weights in that dtype, autocast (CUDA)
    compile: bool
    channels_last: bool

    @property
    def label(self) -> str:
        bits = ["fp32" if self.precision == "no" else self.precision]
        bits += ["compile"] * self.compile + ["channels-last"] * self.channels_last
        return " + ".join(bits)


class BareLoop:
    """One step of diffusers' train_text_to_image_lora.py (without accelerate), same model and batch."""

    def __init__(self, parts: Any, pixels: torch.Tensor, ids: torch.Tensor, v: Variant) -> None:
        self.p, self.pixels, self.ids, self.v = parts, pixels, ids, v
        self.params = [p for p in parts.unet.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=1e-2)
        self.device = parts.unet.device
        self.dtype = next(parts.vae.parameters()).dtype
        self.autocast = v.precision != "no" and self.device.type == "cuda"
        self.ac_dtype = torch.bfloat16 if v.precision == "bf16" else torch.float16
        self.unet = parts.unet
        if v.compile:
            from dallm.image.trainer import COMPILE_BACKEND  # the backend dallm's step uses

            self.unet = torch.compile(parts.unet, backend=COMPILE_BACKEND, dynamic=False)

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
        if self.v.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.ac_dtype, enabled=self.autocast):
            with torch.no_grad():
                hidden = p.text_encoder(self.ids.to(self.device), return_dict=False)[0]
            pred = self.unet(noisy, t, hidden, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


class Engine:
    """One variant: its own model copy with LoRA, dallm's ImageTrainer, CS watchers and a bare loop."""

    def __init__(self, v: Variant, args: argparse.Namespace, device: torch.device, images: Any) -> None:
        from dallm.config import config_from_dict
        from dallm.engine.metrics_log import MetricsLog
        from dallm.image.trainer import ImageTrainer
        from dallm.monitor.cs import CosineSimilarity
        from dallm.monitor.early_stop import EarlyStop

        self.v, self.device, self.images = v, device, images
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(v.precision, torch.float32)
        torch.manual_seed(0)  # every copy gets the same random weights
        self.parts = load(args.shape, device, dtype if device.type == "cuda" else torch.float32)
        tmp = Path(tempfile.mkdtemp())
        self.cfg = config_from_dict(
            {
                "data": {"dir": str(tmp)},
                "lora": {"rank": args.rank},
                "train": {
                    "steps": 10**6,
                    "device": str(device),
                    "mixed_precision": v.precision,
                    "compile": v.compile,
                    "channels_last": v.channels_last,
                },
                "monitor": {"window": 10, "early_stop": "notify"},
            }
        )
        self.trainer = ImageTrainer(self.cfg, self.parts, images, None, device)
        self.watch = {
            "eager": EarlyStop(self.parts.unet, self.cfg, has_validation=False),
            "graph": EarlyStop(
                self.parts.unet,
                self.cfg,
                has_validation=False,
                cs_fn=CosineSimilarity(self.parts.unet, cuda_graph=True),
            ),
        }
        self.watched = dict.fromkeys(self.watch, 0)
        self.log = MetricsLog(tmp / "metrics.jsonl")
        self.step_no = 0
        self.bare: BareLoop | None = None

    def set_batch(self, bs: int) -> None:
        train = self.cfg.train.model_copy(update={"batch_size": bs})
        self.trainer.cfg = self.cfg.model_copy(update={"train": train})
        ids = self.trainer._token_ids(self.images.captions[:bs])
        self.bare = BareLoop(self.parts, self.images.pixels[:bs], ids, self.v)

    def step(self, cs: str | None) -> None:
        """A dallm step; `cs`: None (monitoring off), "eager" or "graph" (CS + CSF every step)."""
        values = self.trainer.step(self.step_no)
        self.step_no += 1
        if cs is not None:
            self.watched[cs] += 1  # each detector wants consecutive steps
            values["cs"] = self.watch[cs].observe(self.watched[cs], values["lr"]).cs or 0.0
        self.log.write(self.step_no, values)

    def eager_flops(self) -> int:
        """FLOPs of one dallm step, counted on the eager UNet (FlopCounterMode sees eager ops)."""
        compiled, self.trainer.unet_forward = self.trainer.unet_forward, self.parts.unet
        try:
            return count_flops(lambda: self.step(None))
        finally:
            self.trainer.unet_forward = compiled


def variants(args: argparse.Namespace, device: torch.device) -> tuple[Variant, dict[str, Variant], list[str]]:
    """The main variant, {"without OPTION": copy with that option off}, and notes on what was skipped."""
    notes: list[str] = []
    precision = args.mixed_precision
    if precision != "no" and device.type != "cuda":
        notes.append(f"--mixed-precision {precision}: autocast is CUDA-only in dallm; ran fp32 on {device}")
        precision = "no"
    main = Variant(precision, args.compile, args.channels_last)
    known = {"precision", "compile", "channels_last"}
    ablate = known if args.ablate == "all" else set(args.ablate.split(",")) - {""}
    if not ablate <= known:
        sys.exit(f"--ablate: unknown {sorted(ablate - known)}; use all or a list of {sorted(known)}")
    off = {}
    if main.precision != "no" and "precision" in ablate:
        off[f"fp32 instead of {main.precision}"] = Variant("no", main.compile, main.channels_last)
    if main.compile and "compile" in ablate:
        off["without compile"] = Variant(main.precision, False, main.channels_last)
    if main.channels_last and "channels_last" in ablate:
        off["without channels-last"] = Variant(main.precision, main.compile, False)
    return main, off, notes


def timed(modes: dict[str, Any], steps: int, block: int, warmup: int, device: torch.device) -> dict:
    """Step times per mode: warm-up (compilation happens here), then interleaved blocks."""
    times: dict[str, list[float]] = {m: [] for m in modes}
    for fn in modes.values():
        for _ in range(warmup):
            fn()
    order = list(modes)
    while min(len(v) for v in times.values()) < steps:
        for name in order:
            for _ in range(block):
                sync(device)
                t = time.perf_counter()
                modes[name]()
                sync(device)
                times[name].append(time.perf_counter() - t)
        order = order[1:] + order[:1]  # rotate, so no mode always follows the same one
    return times


def ms(v: list[float]) -> str:
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return f"{statistics.median(v) * 1000:.1f} ms [{q[0] * 1000:.1f}-{q[2] * 1000:.1f}]"


def pct(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+.1f}%"


def row(bs: int, flops: int, times: dict[str, list[float]], cs_alone: dict[str, float], ctx: dict) -> str:
    med = {m: statistics.median(v) for m, v in times.items()}
    off, on = med["dallm off"], med["dallm CS"]
    cells = [
        str(bs),
        f"{flops / 1e9:,.4g}",
        ms(times["bare"]),
        f"{ms(times['dallm off'])} ({pct(off, med['bare'])} vs bare)",
        f"{ms(times['dallm CS'])} ({pct(on, off)} vs off)",
    ]
    for kind, t in cs_alone.items():
        cells.append(f"{t * 1000:.2f} ms = {100 * t / off:.2f}% of step ({kind}; target < 1%)")
    tflops = flops / off / 1e12
    cells += [f"{tflops:.3g}", mfu_text(tflops, ctx["device_name"], ctx["precision"])]
    for label in ctx["ablations"]:
        cells.append(f"{ms(times[label])} ({med[label] / off:.2f}x main)")
    return "| " + " | ".join(cells) + " |"


def header(ctx: dict) -> str:
    cols = ["batch", "GFLOP/step", "bare diffusers+peft", "dallm, monitoring off", "dallm, CS every step"]
    cols += [f"CS alone ({k})" for k in ctx["cs_kinds"]]
    cols += ["TFLOP/s (dallm)", "MFU (dallm)"] + [f"dallm off, {a}" for a in ctx["ablations"]]
    return "| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["sd15", "tiny", "micro"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode and batch size")
    ap.add_argument("--block", type=int, default=0, help="steps per interleaved block (default: steps // 4)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1", help="comma-separated, e.g. 1,4,8")
    ap.add_argument("--resolution", type=int, default=0, help="image size (default: the model's)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    ap.add_argument("--compile", action="store_true", help="train.compile (torch.compile of the UNet)")
    ap.add_argument("--channels-last", action="store_true", help="train.channels_last")
    ap.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (aot_eager: the plumbing without code generation, for a CPU try)",
    )
    ap.add_argument(
        "--ablate",
        default="all",
        help="options to also run switched off, for their ratio: all, or a list of precision,compile,channels_last",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    ap.add_argument(
        "--out", default="", help="write the table here (default: $OUT/bench_engine.md if $OUT is set)"
    )
    args = ap.parse_args()
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        assert sizes and min(sizes) >= 1
    except (ValueError, AssertionError):
        sys.exit(f"--batch-sizes: {args.batch_sizes!r} is not a comma-separated list of sizes >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "GPU rows: not measured (no GPU lent: CUDA is not available here); try --device cpu --shape tiny"
        )
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    import dallm.image.trainer

    dallm.image.trainer.COMPILE_BACKEND = args.compile_backend
    if hasattr(torch._dynamo.config, "recompile_limit"):  # one graph per (model copy, batch size)
        torch._dynamo.config.recompile_limit = 64
    from dallm.image.data import ImageSet

    device = torch.device(args.device)
    main_v, off, notes = variants(args, device)
    t0 = time.perf_counter()
    # SD 1.5: 64 latents x 8 (VAE), without building the model; tiny / micro load in a second
    native = SD15_UNET["sample_size"] * 8 if args.shape == "sd15" else load(args.shape, device, torch.float32)
    res = args.resolution or (native if isinstance(native, int) else native.resolution)
    n = max(4, *sizes)
    pixels = torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    images = ImageSet(
        pixels, ["a red circle in the style of a painting"] * n, [Path(f"{i}.png") for i in range(n)]
    )
    engines = {"main": Engine(main_v, args, device, images)}
    engines |= {what: Engine(v, args, device, images) for what, v in off.items()}
    main_e = engines["main"]
    name = device_name(args.device)
    ctx = {
        "device_name": name,
        "precision": main_v.precision,
        "ablations": list(off),
        "cs_kinds": ["eager", "CUDA graph"] if device.type == "cuda" else ["eager"],
    }
    load_avg = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"
    title = (
        f"bench_engine {datetime.date.today()}: {args.shape} {res}px, rank {args.rank} "
        f"({sum(p.numel() for p in main_e.trainer.unet_params):,} LoRA params in "
        f"{len(main_e.watch['eager'].cs_fn.pairs)} layers), {name}, main: {main_v.label}"
        f"{f' (backend {args.compile_backend})' if main_v.compile else ''}; "
        f"median [p25-p75] of {args.steps} timed steps per mode in interleaved blocks, one run, "
        f"load {load_avg} at start; models loaded in {time.perf_counter() - t0:.0f} s"
    )
    print(title, *notes, sep="\n", flush=True)
    out = (
        Path(args.out)
        if args.out
        else (Path(os.environ["OUT"]) / "bench_engine.md" if os.environ.get("OUT") else None)
    )
    rows: list[str] = []
    block = args.block or max(1, args.steps // 4)
    for bs in sizes:
        for e in engines.values():
            e.set_batch(bs)
        flops = main_e.eager_flops()
        assert main_e.bare is not None
        modes: dict[str, Any] = {
            "bare": main_e.bare.step,
            "dallm off": lambda: main_e.step(None),
            "dallm CS": lambda: main_e.step("eager"),
        }
        for label in ctx["ablations"]:
            modes[label] = lambda e=engines[label]: e.step(None)
        t = time.perf_counter()
        times = timed(modes, args.steps, block, args.warmup, device)
        cs_alone = {}
        for kind, key in zip(ctx["cs_kinds"], ["eager", "graph"], strict=False):
            fn = main_e.watch[key].cs_fn
            cs_alone[kind] = statistics.median(timed({kind: fn}, max(5, args.steps), 1, 2, device)[kind])
        rows.append(row(bs, flops, times, cs_alone, ctx))
        print(f"batch {bs}: {time.perf_counter() - t:.0f} s", flush=True)
        table = "\n".join([title, *notes, "", header(ctx), *rows]) + "\n"
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(table)
    print("\n" + "\n".join([header(ctx), *rows]))
    if device.type != "cuda":
        print("\nGPU rows: not measured (no GPU lent); bench/gpu_check.sh runs them on a GPU")
    for e in engines.values():
        e.log.close()


if __name__ == "__main__":
    main()
