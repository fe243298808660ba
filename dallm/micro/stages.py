"""The micro world's models and the loops that train them (the stages `dallm.micro.build` runs):
the CLIP tokenizer of the world's words, VAE, text encoder, UNet, the EMA of their weights, and the
VAE, UNet + text encoder and feature-net training loops."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dallm.micro import featnet as featnet_mod
from dallm.micro.world import SIZE, WORDS

MAX_TOKENS = 16
LATENT = SIZE // 4


# ----------------------------------------------------------------------------------------------
# Models


def write_tokenizer(folder: Path) -> None:
    """CLIP BPE tokenizer: byte alphabet plus the world's words, each one token.

    Longer words' merges come first, so that a short word's merge ("i n</w>" of "in") cannot split
    a longer word ("plain" -> "pla" + "in</w>").
    """
    from transformers import CLIPTokenizer

    from dallm.image.tiny import write_clip_tokenizer

    write_clip_tokenizer(folder, sorted(WORDS, key=len, reverse=True), max_length=MAX_TOKENS)
    tok = CLIPTokenizer.from_pretrained(folder)
    split = [w for w in WORDS if len(tok.encode(w, add_special_tokens=False)) != 1]
    if split:
        raise RuntimeError(f"tokenizer splits world words: {split}")


def make_scheduler_config() -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
        mid_block_add_attention=False,
    )


def make_text_encoder(vocab_size: int, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def make_unet(channels: tuple[int, int] = (48, 96)):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=16,
        norm_num_groups=16,
    )


def _optimise(opt: torch.optim.Optimizer, loss: torch.Tensor, clip: list | None = None) -> float:
    """One optimiser step on `loss` (gradients clipped to norm 1 over `clip` when given)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    return float(loss.detach())


def _lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


class EMA:
    def __init__(self, modules: list[torch.nn.Module], decay: float = 0.999) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay
        self.n = 0

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to(self) -> None:
        for p, s in zip(self.params, self.shadow, strict=True):
            p.copy_(s)


# ----------------------------------------------------------------------------------------------
# Training stages


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, device, gen: torch.Generator, log) -> float:
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    loss_v = float("nan")
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, 1e-3, warmup=50)
        idx = torch.randint(len(images), (batch,), generator=gen)
        x = images[idx].to(device) * 2 - 1
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
        rec = vae.decode(z).sample
        kl = 0.5 * (post.mean.pow(2) + post.var - 1 - post.logvar).mean()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
        loss_v = _optimise(opt, loss)
        if step % 250 == 0 or step == steps - 1:
            log(f"  vae {step:5d}/{steps} loss {loss_v:.4f}")
    vae.eval().requires_grad_(False)
    return loss_v


@torch.no_grad()
def encode(vae, images: torch.Tensor, device, bs: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), bs):
        post = vae.encode(images[i : i + bs].to(device) * 2 - 1).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, device, bs: int = 512) -> torch.Tensor:
    out = []
    for i in range(0, len(images), bs):
        x = images[i : i + bs].to(device) * 2 - 1
        out.append(((vae.decode(vae.encode(x).latent_dist.mean).sample + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)


def train_unet(
    unet, text_encoder, scheduler, mu, sd, scale, ids, steps, batch, device, gen, log
) -> tuple[float, float]:
    """Joint UNet + text encoder training (v-prediction), EMA weights copied in at the end."""
    unet.to(device).train()
    text_encoder.to(device).train()
    trainable = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(trainable, lr=5e-4, weight_decay=1e-2)
    ema = EMA([unet, text_encoder], decay=0.999)
    acp = scheduler.alphas_cumprod.to(device)
    losses: list[float] = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, 6e-4)
        idx = torch.randint(len(mu), (batch,), generator=gen)
        eps_lat = torch.randn(mu[idx].shape, generator=gen)
        lat = ((mu[idx] + sd[idx] * eps_lat) * scale).to(device)
        noise = torch.randn(lat.shape, generator=gen).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen).to(device)
        a = acp[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
        noisy = a * lat + s * noise
        target = a * noise - s * lat  # v
        cond = text_encoder(ids[idx].to(device))[0]
        pred = unet(noisy, t, cond).sample
        loss = F.mse_loss(pred, target)
        losses.append(_optimise(opt, loss, clip=trainable))
        ema.update()
        if step % 250 == 0 or step == steps - 1:
            log(f"  unet {step:5d}/{steps} loss {np.mean(losses[-100:]):.4f}")
    ema.copy_to()
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return float(np.mean(losses[-200:])), float(losses[-1])


def train_featnet(net, images, targets, recon_images, recon_targets, steps, batch, device, gen, log) -> float:
    net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    x_all = torch.cat([images, recon_images])
    y_all = torch.cat([targets, recon_targets])
    keys = list(featnet_mod.HEADS)
    loss_v = float("nan")
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, 2e-3, warmup=50)
        idx = torch.randint(len(x_all), (batch,), generator=gen)
        x = x_all[idx]
        # Robustness to sample artefacts: noise, small brightness/contrast changes, slight blur.
        x = x * (1 + 0.08 * (torch.rand(batch, 1, 1, 1, generator=gen) - 0.5))
        x = x + 0.06 * torch.rand(batch, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
        blur = torch.rand(batch, generator=gen) < 0.3
        if blur.any():
            k = torch.tensor([1.0, 2.0, 1.0]) / 4
            k2 = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
            x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k2, groups=3)
        x = x.clamp(0, 1).to(device)
        y = y_all[idx].to(device)
        logits = net.logits(x)
        loss = sum(F.cross_entropy(logits[k], y[:, i]) for i, k in enumerate(keys))
        loss_v = _optimise(opt, loss)
        if step % 250 == 0 or step == steps - 1:
            log(f"  featnet {step:5d}/{steps} loss {loss_v:.4f}")
    net.eval().requires_grad_(False)
    with torch.no_grad():
        sub = images[torch.linspace(0, len(images) - 1, min(len(images), 4096)).long()]
        f = torch.cat([net.features(sub[i : i + 512].to(device)) for i in range(0, len(sub), 512)])
        net.feature_scale.fill_(float(1.0 / f.pow(2).mean().sqrt().clamp_min(1e-6)))
    return loss_v
