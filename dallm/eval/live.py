"""Live evaluation of a training job: fixed-seed sample grids, KID to three references and the
other signals of `dallm.eval.signals` (validation loss, prompt fidelity, the evidence kept per step).

The training loop constructs one `LiveEvaluator` per job (its `dallm.eval.interface.Evaluator`) and
asks `due(step)` after each step (`dallm.eval.schedule.EvalSchedule` says what is due); `run(step)`
makes what is due, emits the `SampleEvent`s itself and returns the scalars (kid_*, base_kid_* (+
_std), val_loss*, fidelity*, base_*, eval_seconds, eval_share) for the engine's metrics row of that
step. `finish(final_step)` evaluates the stop step, writes the evolution strips and returns the cost
(result.json's "eval"); `result` measures the weights the job returns; `evidence` is what
monitor.select = "evidence" compares.

KID (the study's Section 2.3) compares `eval.num_images` images generated from the eval prompts
(default: the training captions) with fixed initial noise to (a) the training targets (`data.dir`,
the first `data.limit`), (b) the held-out targets (`eval.val_dir`; its spread is the std of the
mean, `dallm.eval.kid_spread`), (c) the base model's images for the same prompts (learned tokens
replaced by `tokens.init_word`, or removed) and noise, generated once per job with every adapter
off (features cached in `eval/base_features.pt`, images in `eval/base/`), shared between jobs as the
targets' are (`dallm.eval.cache`). Here evaluation happens in the loop; `BackgroundEvaluator`
(`dallm.eval.background`) wraps a `LiveEvaluator` whose `Work` is done by a process of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dallm.config import JobConfig
from dallm.eval.cache import FeatureCache, cache_root, files_fingerprint, model_fingerprint
from dallm.eval.inputs import Extractor, configured_extractor, features_of_files, target_images
from dallm.eval.interface import Arrived, InLoopResults, Weights, Work
from dallm.eval.kid import SampleCount, subset_for
from dallm.eval.sample_grids import write_evolution, write_grid
from dallm.eval.schedule import eval_schedule
from dallm.eval.signals import Signals, kid_values
from dallm.image.sampling import (
    ModelLike,
    SamplerSettings,
    adapters_disabled,
    generate,
    initial_latents,
    latent_shape,
    sampling_mode,
    strip_tokens,
    to_pil,
)
from dallm.monitor.selection import EvidenceSet
from dallm.protocol import JobEvent, LogEvent, MetricsEvent, Phase, PhaseEvent, SampleEvent
from dallm.protocol.files import EVAL_SUMMARY_FILE, EvalSummary, write_json

log = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 0x5EED  # eval noise differs from the sample grids' seeds


class LiveEvaluator(InLoopResults):
    """Sample grids every `samples.every` steps, KID every `eval.every` steps and at the end."""

    validation_measure = "kid_val"

    def __init__(
        self,
        cfg: JobConfig,
        parts: ModelLike,
        out_dir: Path,
        emit: Callable[[JobEvent], None],
        device: torch.device,
        weight_dtype: torch.dtype,
        train_prompts: list[str],
        *,
        extractor: Extractor | None = None,
        clock: Callable[[], float] = time.perf_counter,
        load_extractor: bool = True,
        work: Work | None = None,
    ) -> None:
        self.cfg, self.parts, self.out_dir, self.emit = cfg, parts, Path(out_dir), emit
        self.device, self.weight_dtype, self.clock = torch.device(device), weight_dtype, clock
        self.work: Work = work or self
        self.started = clock()
        self.schedule = eval_schedule(cfg)
        ev = cfg.eval
        self._prompt_cycle = list(ev.prompts) or [p for p in train_prompts if p] or [cfg.data.instance_prompt]
        shape = latent_shape(parts, cfg.model.resolution)
        self._sample_latents = initial_latents(cfg.samples.seeds, shape)
        gen = torch.Generator().manual_seed(cfg.seed + EVAL_SEED_OFFSET)
        self._first_latents = torch.randn((ev.num_images, *shape), generator=gen)
        self.count: SampleCount | None = None  # chosen for eval.kid_std_target at the first evaluation
        self._use_images(ev.num_images)
        self._extractor = extractor
        self._refs: dict[str, torch.Tensor] = {}
        self._base_kid: dict[str, float] = {}  # base_kid_train, base_kid_val (+ _std): constant lines
        self.base_generations = 0  # how many times the base images were generated (tests: once)
        self.kid_history: dict[int, dict[str, float]] = {}
        self._subset_warned: set[str] = set()
        self.sample_steps: list[int] = []
        self.eval_seconds: list[float] = []  # per KID evaluation (the first includes the references)
        self.stop_seconds: list[float] = []  # per `run` (samples and/or KID): what the ETA counts
        self.sample_seconds = 0.0
        self.setup_seconds = 0.0  # loading the feature extractor
        self.cache = FeatureCache(cache_root(ev.cache_dir), ev.cache)
        self._arrived: list[Arrived] = []
        if self.schedule.measures:  # fail before training on folders or an extractor that cannot be used
            self._train_files = target_images(Path(cfg.data.dir or "."), "data.dir", cfg.data.limit)
            self._val_files = target_images(ev.val_dir, "eval.val_dir") if ev.val_dir else []
            if load_extractor:
                t0 = clock()
                _ = self.extractor
                self.setup_seconds = clock() - t0
        self.signals = Signals(
            cfg, parts, self.out_dir, self.device, lambda p, z, base: self._generate(p, z, self._settings(ev.steps, ev.guidance), base),
            lambda: self.extractor, train_prompts, self.base_prompt, shape, getattr(self, "_train_files", []),
        )  # fmt: skip

    def _use_images(self, n: int) -> None:
        """Evaluate with `n` images from now on: image i keeps its prompt and noise whatever n is
        (noise beyond eval.num_images comes from a second seed, so the first ones never change)."""
        ev, first = self.cfg.eval, self._first_latents
        self.eval_prompts = [self._prompt_cycle[i % len(self._prompt_cycle)] for i in range(n)]
        self.base_prompts = [self.base_prompt(p) for p in self.eval_prompts]
        if n <= ev.num_images:
            self._eval_latents = first[:n]
        else:
            gen = torch.Generator().manual_seed(self.cfg.seed + EVAL_SEED_OFFSET + 1)
            self._eval_latents = torch.cat(
                [first, torch.randn((n - len(first), *first.shape[1:]), generator=gen)]
            )

    def _noise_key(self) -> list[Any]:
        """The eval noise in cache keys: today's [seed, shape] at eval.num_images, plus how the
        images were added or dropped for a count chosen by eval.kid_std_target."""
        key: list[Any] = [self.cfg.seed + EVAL_SEED_OFFSET, list(self._first_latents.shape)]
        n, n0 = len(self._eval_latents), self.cfg.eval.num_images
        if n > n0:
            key += ["extra", self.cfg.seed + EVAL_SEED_OFFSET + 1, n - n0]
        elif n < n0:
            key += ["first", n]
        return key

    def base_prompt(self, prompt: str) -> str:
        """`prompt` for the base model: learned tokens replaced by `tokens.init_word`, or removed."""
        return strip_tokens(prompt, self.cfg.tokens.new, self.cfg.tokens.init_word or "")

    # -- the loop's requests ---------------------------------------------------------------------

    def due(self, step: int) -> bool:
        return self.schedule.due(step)

    def submit(self, step: int, weights: Weights) -> None:
        """Evaluate what is due at `step`; here in the loop (`collect` hands the values out).
        `dallm.eval.background.BackgroundEvaluator` sends a copy of the weights to its process instead."""
        values = self.run(step)
        keep = self.validation_measure in values  # early stopping may return these weights
        self._arrived.append(Arrived(step, values, weights(step) if keep else None))

    def run(self, step: int) -> dict[str, float]:
        """Samples and/or KID at `step` with the current weights; returns the scalars for metrics."""
        t0 = self.clock()
        self.forget_from(step)
        values: dict[str, float] = {}
        if self.schedule.samples_due(step):
            self._phase("sampling", step)
            self.samples(step)
        if self.schedule.measure_due(step):
            self._phase("kid", step)
            values.update(self.evaluate(step))
            values["eval_num_images"] = float(len(self.eval_prompts))  # chosen by eval.kid_std_target
        if values or self.schedule.samples_due(step):
            values["eval_seconds"] = self.clock() - t0
            values["eval_share"] = self.share()
            self.stop_seconds.append(values["eval_seconds"])
            values["eval_stop_seconds"] = sum(self.stop_seconds) / len(self.stop_seconds)
        return values

    def _phase(self, phase: Phase, step: int) -> None:
        self.emit(PhaseEvent(phase=phase, step=step, at=time.time()))

    def forget_from(self, step: int) -> None:
        """A step at or before one already seen: the job was rolled back and resumed; what was
        recorded from there on belongs to the superseded history."""
        self.kid_history = {s: v for s, v in self.kid_history.items() if s < step}
        self.sample_steps = [s for s in self.sample_steps if s < step]

    def finish(self, final_step: int) -> dict[str, float]:
        """Final samples and KID (unless made at `final_step` already) and the evolution strips.

        Returns kid_* of the final step and the cost summary (eval_count, eval_seconds_total,
        eval_seconds_mean (the first includes the target features and the base samples),
        eval_setup_seconds (loading the extractor), sample_seconds_total, eval_share (all of these
        over the wall time since the evaluator was made), wall_seconds).
        """
        out: dict[str, float] = {}
        if self.schedule.samples_on and final_step not in self.sample_steps:
            self._phase("sampling", final_step)
            self.work.samples(final_step)
        if self.schedule.measures:
            if final_step in self.kid_history:
                out.update(self.kid_history[final_step])
            else:
                self._phase("kid", final_step)
                out.update(self.work.evaluate(final_step))
                self.emit(MetricsEvent(step=final_step, values=dict(out)))
        if self.schedule.samples_on:
            write_evolution(self.out_dir)
        summary = self.summary()
        out.update(summary)
        if self.eval_seconds or self.sample_seconds:
            self.emit(
                LogEvent(
                    message=f"evaluation: {summary['eval_count']:.0f} KID runs, "
                    f"{summary['eval_seconds_mean']:.1f} s each, samples {summary['sample_seconds_total']:.1f} s, "
                    f"{100 * summary['eval_share']:.1f}% of {summary['wall_seconds']:.0f} s wall time"
                )
            )
        return out

    def result(
        self,
        result_step: int,
        turning_step: int | None,
        final_step: int,
        result_weights: AbstractContextManager[None],
    ) -> dict[str, float]:
        """KID of the result: reused when `result_step` was evaluated, else measured now from the
        weights `result_weights` puts into the model (the complete result state: UNet and
        text-encoder LoRA and token rows). Returns result_kid_* and, when the turning point was
        evaluated or is the result, turning_kid_*; writes them with the summary to eval/summary.json.
        """
        out: dict[str, float] = {}
        if self.schedule.measures:
            res = self.kid_history.get(result_step)
            if res is None:
                self._phase("kid", result_step)
                with result_weights:
                    res = self.work.evaluate(result_step)
            out.update({f"result_{k}": v for k, v in res.items()})
            at_tp = self.kid_history.get(turning_step) if turning_step is not None else None
            if at_tp is not None:
                out.update({f"turning_{k}": v for k, v in at_tp.items()})
        final = self.kid_history.get(final_step, {})
        summary = EvalSummary(final_step=final_step, turning_point=turning_step, result_step=result_step,
                              sample_count=self.count.describe() if self.count else None,
                              **(final | out | self.summary()))  # fmt: skip
        write_json(self.out_dir / EVAL_SUMMARY_FILE, summary)
        return out

    def summary(self) -> dict[str, float]:
        total = sum(self.eval_seconds)
        counts = self.count.values() if self.count is not None else {}
        own = {
            "eval_cache_hits": float(self.cache.hits),
            "eval_cache_misses": float(self.cache.misses),
            "eval_count": float(len(self.eval_seconds)),
            "eval_seconds_total": total,
            "eval_seconds_mean": total / len(self.eval_seconds) if self.eval_seconds else 0.0,
            "eval_setup_seconds": self.setup_seconds,
            "sample_seconds_total": self.sample_seconds,
            "eval_share": self.share(),
            "wall_seconds": self.clock() - self.started,
        }
        return counts | own | self.work.work_summary()

    def trainer_seconds(self) -> float:
        """Seconds the training loop spent on evaluation: here all of it (extractor, samples, KID)."""
        return self.setup_seconds + sum(self.eval_seconds) + self.sample_seconds

    def work_summary(self) -> dict[str, float]:
        """Nothing beyond `summary`: the work is this evaluator's own."""
        return {}

    def share(self) -> float:
        """The trainer's evaluation seconds as a fraction of the wall time since the evaluator was made."""
        wall = max(self.clock() - self.started, 1e-9)
        return self.work.trainer_seconds() / wall

    # -- samples --------------------------------------------------------------------------------

    def _settings(self, steps: int, guidance: float) -> SamplerSettings:
        return SamplerSettings(steps, guidance, self.cfg.eval.batch_size, self.cfg.model.resolution)

    def _modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.parts.unet, self.parts.vae, self.parts.text_encoder)

    def _generate(
        self, prompts: Sequence[str], latents: torch.Tensor, settings: SamplerSettings, base: bool
    ) -> torch.Tensor:
        with sampling_mode(*self._modules()):
            if base:
                with adapters_disabled(self.parts.unet, self.parts.text_encoder):
                    return generate(self.parts, prompts, latents, settings, self.device, self.weight_dtype)
            return generate(self.parts, prompts, latents, settings, self.device, self.weight_dtype)

    def sample_grid(self, base: bool = False) -> list[Image.Image]:
        """The grid's images, row-major (prompts x seeds), from the current weights (or the base)."""
        sc = self.cfg.samples
        prompts = [self.base_prompt(p) if base else p for p in sc.prompts]
        grid_prompts = [p for p in prompts for _ in sc.seeds]
        latents = self._sample_latents.repeat(len(prompts), 1, 1, 1)
        return to_pil(self._generate(grid_prompts, latents, self._settings(sc.steps, sc.guidance), base))

    def samples(self, step: int) -> None:
        t0 = self.clock()
        sc = self.cfg.samples
        if not self.sample_steps and not (self.out_dir / "samples" / "base.png").exists():
            self._base_grid()
        record, thumb = write_grid(self.out_dir, step, self.sample_grid(), sc.prompts, sc.seeds, sc.thumbnail)
        self.sample_steps.append(step)
        self.sample_seconds += self.clock() - t0
        self.emit(
            SampleEvent(
                step=step, path=record.path, png=thumb, prompts=list(sc.prompts), seeds=list(sc.seeds)
            )
        )

    def _base_grid(self) -> None:
        """The base model's grid, written and sent once: the TUI's gallery sets it beside the turning
        point's and the latest grid."""
        sc = self.cfg.samples
        record, thumb = write_grid(
            self.out_dir, None, self.sample_grid(base=True), sc.prompts, sc.seeds, sc.thumbnail
        )
        self.emit(
            SampleEvent(
                step=0, path=record.path, png=thumb, prompts=list(sc.prompts), seeds=list(sc.seeds), base=True
            )
        )

    def prime_base(self) -> None:
        """Make the base model's sample grid and KID features now (before training), for a job that
        changes the base weights themselves (train.method = "full": no adapters to turn off)."""
        if self.schedule.samples_on and not (self.out_dir / "samples" / "base.png").exists():
            self._base_grid()
        if self.schedule.measures:
            self.references()
            self.signals.prime()

    # -- KID ------------------------------------------------------------------------------------

    @property
    def extractor(self) -> Extractor:
        if self._extractor is None:
            self._extractor = configured_extractor(self.cfg, self.device)
        return self._extractor

    def _generated_features(
        self, prompts: Sequence[str], base: bool, save_dir: Path | None = None, first: int = 0
    ) -> torch.Tensor:
        """Features of the eval images `first`.. for `prompts`, a batch at a time (images are not all kept)."""
        ev = self.cfg.eval
        settings = self._settings(ev.steps, ev.guidance)
        feats = []
        for start in range(first, len(prompts), ev.batch_size):
            end = min(start + ev.batch_size, len(prompts))
            images = self._generate(prompts[start:end], self._eval_latents[start:end], settings, base)
            feats.append(torch.as_tensor(self.extractor(images)).detach().float().cpu())
            if save_dir is not None:
                save_dir.mkdir(parents=True, exist_ok=True)
                for i, im in enumerate(to_pil(images), start=start):
                    im.save(save_dir / f"{i:04d}.png")
        return torch.cat(feats)

    def _base_key(self) -> dict[str, Any]:
        ev = self.cfg.eval
        return {
            "model": str(getattr(self.parts, "source", self.cfg.model.base)),
            "features": ev.features,
            "prompts": self.base_prompts,
            "seed": self.cfg.seed,
            "steps": ev.steps,
            "guidance": ev.guidance,
            "resolution": self.cfg.model.resolution,
        } | ({"noise": self._noise_key()} if len(self._eval_latents) != self.cfg.eval.num_images else {})

    def references(self) -> dict[str, torch.Tensor]:
        """Features of the training targets, the validation targets and the base samples (once)."""
        if self._refs:
            return self._refs
        refs = {"train": self._target_features(self._train_files)}
        if self._val_files:
            refs["val"] = self._target_features(self._val_files)
        refs["base"] = self._base_features()
        if self.cfg.eval.kid_std_target is not None and self.count is None:
            self.count = self._choose_count(refs)
            if self.count.num_images != len(self.eval_prompts):
                self._use_images(self.count.num_images)
                refs["base"] = self._base_features(have=refs["base"])
        self._refs = refs
        return refs

    def _choose_count(self, refs: dict[str, torch.Tensor]) -> SampleCount:
        """The sample count for eval.kid_std_target (`dallm.eval.kid.count_for_target`), logged."""
        from dallm.eval.kid import count_for_target

        count = count_for_target(self.cfg.eval, refs, self.cfg.seed)
        self.emit(LogEvent(level="warning" if count.limit != "target" else "info", message=count.describe()))
        return count

    def _extractor_key(self) -> dict[str, Any]:
        ev = self.cfg.eval
        weights = [str(ev.inception_weights)] if ev.inception_weights else []
        return {"features": ev.features, "weights": weights}

    def _target_features(self, paths: Sequence[Path]) -> torch.Tensor:
        """Features of target files, from the shared cache when the same files were seen before."""
        key = {"kind": "targets", **self._extractor_key(), "files": files_fingerprint(list(paths))}
        feats = self.cache.get(key)
        if feats is None:
            feats = features_of_files(self.extractor, paths, self.cfg.eval.batch_size)
            self.cache.put(key, feats)
        return feats

    def shared_base_key(self) -> dict[str, Any]:
        """Everything the base model's eval images and their features depend on (the shared cache's
        key): model files, prompts, initial noise, sampler, dtype and extractor."""
        key = self._base_key()
        key.update(self._extractor_key())
        key.update(
            kind="base",
            model=model_fingerprint(str(getattr(self.parts, "source", self.cfg.model.base))),
            noise=self._noise_key(),
            sampler="ddim-eta0",
            dtype=str(self.weight_dtype),
        )
        return key

    def _base_features(self, have: torch.Tensor | None = None) -> torch.Tensor:
        """Features of the base model's eval images; `have`: those of the first images, already made."""
        shared = self.shared_base_key()
        feats = self.cache.get(shared)
        if feats is None:
            feats = self._job_base_features(have)
            self.cache.put(shared, feats)
        return feats

    def _job_base_features(self, have: torch.Tensor | None = None) -> torch.Tensor:
        cache = self.out_dir / "eval" / "base_features.pt"
        key = self._base_key()
        if cache.is_file():
            try:
                saved = torch.load(cache, weights_only=True)
                if saved.get("key") == key:
                    return saved["features"]
            except Exception as e:  # a torn or foreign file: regenerate
                log.warning("ignoring %s: %s", cache, e)
        n = len(self.base_prompts)
        if have is not None and len(have) >= n:
            return have[:n]
        done = have if have is not None else torch.empty(0)
        more = self._generated_features(self.base_prompts, True, cache.parent / "base", first=len(done))
        feats = torch.cat([done, more]) if len(done) else more
        self.base_generations += 1
        tmp = cache.with_suffix(".tmp")
        torch.save({"key": key, "features": feats}, tmp)
        tmp.replace(cache)
        return feats

    def evaluate(self, step: int) -> dict[str, float]:
        """KID of the current weights' eval images to each reference; recorded under `step`."""
        from dallm.eval.kid import kid

        t0 = self.clock()
        ev = self.cfg.eval
        refs = self.references()
        feats = self._generated_features(self.eval_prompts, base=False)
        wanted = self.count.subset_size if self.count is not None else ev.subset_size

        def kid_to(name: str, a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
            if name.endswith("kid_val"):  # the validation KID's spread: the std of the mean (bootstrap)
                return kid_values(name, a, b, ev.kid_bootstrap, self.cfg.seed)
            subset, warning = subset_for(wanted, len(a), len(b))
            if warning is not None and name not in self._subset_warned:  # once per reference
                self._subset_warned.add(name)
                self.emit(LogEvent(level="warning", message=f"{name}: {warning}"))
            mean, std = kid(a, b, subset_size=subset, num_subsets=ev.num_subsets, seed=self.cfg.seed)
            return {name: float(mean), f"{name}_std": float(std)}

        values: dict[str, float] = {}
        for name, ref in refs.items():
            values.update(kid_to(f"kid_{name}", feats, ref))
        if not self._base_kid:  # where the job started from: the base model's samples to the targets
            for name in ("train", "val"):
                if name in refs:
                    self._base_kid.update(kid_to(f"base_kid_{name}", refs["base"], refs[name]))
        values.update(self._base_kid)
        values.update(self.signals.measure())  # validation loss, prompt fidelity
        self.signals.keep(step, feats, refs.get("val"))  # for paired differences at the choice
        self.kid_history[step] = values
        self.eval_seconds.append(self.clock() - t0)
        return values

    def evidence(self, steps: list[int]) -> EvidenceSet | None:
        """What `monitor.select = "evidence"` compares at `steps` (`dallm.eval.evidence.job_evidence`)."""
        from dallm.eval.evidence import job_evidence

        return job_evidence(self.out_dir, self.kid_history, steps, self.cfg.eval.kid_bootstrap, self.cfg.seed)
