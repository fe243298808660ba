"""Issue 23's signals at every evaluation of an image job, beside the KIDs (`dallm.eval.live`):

- `val_loss` (and `val_loss_t<t>`): the repeatable validation loss on eval.val_dir
  (`dallm.eval.val_loss`): the held-out latents encoded once, the same timesteps
  (eval.val_loss_timesteps) and the same noise at every evaluation; the captions are re-encoded
  each time (learned tokens and a text-encoder LoRA change them). `base_val_loss`: the same with
  every adapter off (and the learned tokens replaced as the base KID's prompts are), measured once.
- `fidelity` (and `fidelity_shape`, `_fg`, `_bg`, `_style`): prompt fidelity on eval.fidelity_prompts
  held-out prompts (`dallm.eval.fidelity`), from fixed noise, judged by the micro world's feature
  net; `base_fidelity*`: the base model's, measured once with the adapters disabled.
- KIDs with the std of the mean (`kid_values`: `dallm.eval.kid_spread.kid_mean`, a bootstrap over
  references and samples): every `kid_*_std` is that std ("± std of the mean" where shown).
- Evidence: the validation-KID sample features of each evaluated step (the same prompts and noise
  each time) and the validation references' features, kept in eval/evidence/ (written by whichever
  process evaluates), so that `dallm.eval.evidence.job_evidence` can compute paired differences
  when the job chooses its result (monitor.select = "evidence").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dallm.config import JobConfig, fidelity_judge

FIDELITY_SEED_OFFSET = 0xF1DE  # the fidelity samples' noise differs from the KID samples'
EVIDENCE_DIR = Path("eval") / "evidence"
REFS_FILE = "val_refs.safetensors"
# The metric names an evaluation of the measures returns (what the trainer keeps per step).
MEASURE_PREFIXES = ("kid_", "base_kid_", "val_loss", "base_val_loss", "fidelity", "base_fidelity")

# prompts, initial latents, base (adapters off) -> images [N, 3, H, W] in [0, 1]
Generate = Callable[[Sequence[str], Tensor, bool], Tensor]


def measures_of(values: dict[str, float]) -> dict[str, float]:
    """The measures among an evaluation's values (not its timings)."""
    return {k: v for k, v in values.items() if k.startswith(MEASURE_PREFIXES)}


def evidence_file(out_dir: Path, step: int) -> Path:
    return out_dir / EVIDENCE_DIR / f"step_{step:06d}.safetensors"


def _save(path: Path, features: Tensor) -> None:
    """Features as safetensors (never a pickle: the design card's rule for files read back), atomically."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"features": features.detach().cpu().contiguous()}, str(tmp))
    tmp.replace(path)


def kid_values(name: str, samples: Tensor, refs: Tensor, n_boot: int, seed: int) -> dict[str, float]:
    """`name` (the KID of all samples against all references) and `name_std`, the std of that mean."""
    from dallm.eval.kid_spread import kid_mean

    m = kid_mean(samples, refs, n_boot=n_boot, seed=seed)
    return {name: m.mean, f"{name}_std": m.std}


class Signals:
    """The validation loss, prompt fidelity and evidence of one job's evaluations (module docstring).
    `generate` makes images with the current weights (or the base's); `extractor` gives the KID
    feature extractor (its net judges fidelity when it is the micro one)."""

    def __init__(
        self,
        cfg: JobConfig,
        parts: Any,
        out_dir: Path,
        device: torch.device,
        generate: Generate,
        extractor: Callable[[], Any],
        train_prompts: Sequence[str],
        base_prompt: Callable[[str], str],
        latent_shape: tuple[int, int, int],
        train_files: Sequence[Path],
    ) -> None:
        self.cfg, self.parts, self.out_dir, self.device = cfg, parts, Path(out_dir), device
        self._generate, self._extractor, self.base_prompt = generate, extractor, base_prompt
        ev = cfg.eval
        self.val_loss_on = ev.val_dir is not None and bool(ev.val_loss_timesteps)
        # Held-out prompts exist for the micro world only: a CLIP judge (real models) is not wired yet.
        self.judge = "micro" if fidelity_judge(cfg) == "micro" else None
        self._train_prompts, self._train_files = list(train_prompts), list(train_files)
        self._shape = latent_shape
        self._base: dict[str, float] = {}
        self._refs_kept = False
        self._val: tuple[Tensor, list[str]] | None = None  # held-out latents and captions, once
        self._fid: tuple[list[Any], list[str], Tensor, str] | None = None  # scenes, prompts, noise, style

    # -- the measures at one step --------------------------------------------------------------

    def measure(self) -> dict[str, float]:
        """val_loss* and fidelity* of the current weights, and the base model's (measured once)."""
        out: dict[str, float] = {}
        if self.val_loss_on:
            out.update(self._val_loss(base=False))
        if self.judge is not None:
            out.update(self._fidelity(base=False))
        if not self._base and out:
            self.prime()
        return out | self._base

    def prime(self) -> None:
        """The base model's figures, now (before training, for a job that changes the base weights
        themselves: train.method = "full" has no adapters to turn off later)."""
        if self.val_loss_on:
            self._base.update({f"base_{k}": v for k, v in self._val_loss(base=True).items()})
        if self.judge is not None:
            self._base.update({f"base_{k}": v for k, v in self._fidelity(base=True).items()})

    def keep(self, step: int, samples: Tensor, val_refs: Tensor | None) -> None:
        """The validation-KID sample features of `step` (and the references, once) for paired KIDs."""
        if val_refs is None:
            return
        if not self._refs_kept:  # this job's references (an old folder may hold another job's)
            _save(self.out_dir / EVIDENCE_DIR / REFS_FILE, val_refs)
            self._refs_kept = True
        _save(evidence_file(self.out_dir, step), samples)

    # -- validation loss -----------------------------------------------------------------------

    def _held_out(self) -> tuple[Tensor, list[str]]:
        if self._val is None:
            from dallm.eval.val_loss import encode_latents
            from dallm.image.data import load_images

            cfg = self.cfg
            assert cfg.eval.val_dir is not None
            images = load_images(
                Path(cfg.eval.val_dir), key="eval.val_dir", resolution=self._resolution(),
                prompt=cfg.data.instance_prompt, cfg=cfg.data, caption_ext=cfg.data.caption_ext,
            )  # fmt: skip
            self._val = encode_latents(self.parts.vae, images.pixels, cfg.eval.batch_size), images.captions
        return self._val

    def _resolution(self) -> int:
        from dallm.image.sampling import vae_factor

        return self.cfg.model.resolution or self._shape[1] * vae_factor(self.parts.vae)

    def _val_loss(self, base: bool) -> dict[str, float]:
        from dallm.eval.val_loss import fixed_timesteps, validation_loss
        from dallm.image.sampling import adapters_disabled, encode_prompts, sampling_mode

        latents, captions = self._held_out()
        if base:
            captions = [self.base_prompt(c) for c in captions]
        sched, bs = self.parts.noise_scheduler, self.cfg.eval.batch_size
        ts = fixed_timesteps(sched.config.num_train_timesteps, self.cfg.eval.val_loss_timesteps)
        off = adapters_disabled(self.parts.unet, self.parts.text_encoder) if base else nullcontext()
        with off, sampling_mode(self.parts.text_encoder):
            hidden = torch.cat(
                [
                    encode_prompts(self.parts, captions[i : i + bs], self.device)
                    for i in range(0, len(captions), bs)
                ]
            )
            loss = validation_loss(self.parts.unet, sched, latents, hidden.float().cpu(), ts, batch_size=bs)
        return loss.values()

    # -- prompt fidelity -----------------------------------------------------------------------

    def _net(self) -> Any:
        ext = self._extractor()
        if getattr(ext, "name", None) == "micro":
            return ext.net
        from dallm.micro import load_feature_net

        return load_feature_net(self.device)

    def _fidelity_inputs(self) -> tuple[list[Any], list[str], Tensor, str]:
        if self._fid is None:
            from dallm.eval.fidelity import held_out_prompts

            n = self.cfg.eval.fidelity_prompts
            scenes, prompts = held_out_prompts(n, self._train_prompts)
            gen = torch.Generator().manual_seed(self.cfg.seed + FIDELITY_SEED_OFFSET)
            noise = torch.randn((n, *self._shape), generator=gen)
            self._fid = scenes, prompts, noise, self._target_style()
        return self._fid

    def _target_style(self) -> str:
        """The style the training targets are in, as the feature net judges them (the most common)."""
        from dallm.eval.extractor import load_image, pil_to_tensor
        from dallm.micro.world import STYLES

        net = self._net()
        votes: Counter[int] = Counter()
        for path in self._train_files:
            x = pil_to_tensor(load_image(path))[None].to(next(net.parameters()).device)
            votes[int(net.predict(x)["style"][0])] += 1
        return STYLES[votes.most_common(1)[0][0]] if votes else "baroque"

    def _fidelity(self, base: bool) -> dict[str, float]:
        from dallm.eval.fidelity import micro_fidelity

        scenes, prompts, noise, style = self._fidelity_inputs()
        if base:
            prompts = [self.base_prompt(p) for p in prompts]
        images = self._generate(prompts, noise, base)
        raw = micro_fidelity(self._net(), images, scenes, style)
        return {"fidelity" if k == "fidelity" else f"fidelity_{k}": v for k, v in raw.items()}


__all__ = ["EVIDENCE_DIR", "MEASURE_PREFIXES", "Signals", "evidence_file", "kid_values", "measures_of"]
