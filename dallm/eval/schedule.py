"""When a job evaluates (on its schedule and at every checkpoint step), resolved once from its config (as `dallm.config.window_steps` is): the one
place that says whether samples and measures (KID for an image job, perplexities for an LLM job)
are on, when they are due, and whether there is a validation measure for early stopping.

The training loop, the evaluators of both job kinds and the `StartedEvent` (what the ETA counts)
ask it instead of reading `eval.every` / `samples.every` themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dallm.config import JobConfig


@dataclass(frozen=True)
class EvalSchedule:
    samples_every: int  # sample grids (image) / generations (llm) every this many steps; 0: none
    every: int  # the measures every this many steps; 0: none on a schedule
    # Measured at all: on the schedule and at the end (the stop step, the result). An image job
    # measures at the end also without a schedule when it names eval.val_dir or eval.prompts.
    measures: bool
    validation: bool  # a held-out set: the validation measure (kid_val, ppl_val) is among the values
    # Checkpoints are written every this many steps: with a schedule, the measures are due there too,
    # so that every checkpoint in the list has its figures (issue 24) and can be chosen on them.
    checkpoint_every: int = 0

    @property
    def samples_on(self) -> bool:
        return self.samples_every > 0

    @property
    def active(self) -> bool:
        """Whether the job needs an evaluator at all."""
        return self.samples_on or self.measures

    @property
    def compares_validation(self) -> bool:
        """Validation measures at several steps for `monitor.select` to compare (a schedule is needed)."""
        return self.validation and self.every > 0

    def samples_due(self, step: int) -> bool:
        return self.samples_on and step > 0 and step % self.samples_every == 0

    def measure_due(self, step: int) -> bool:
        if not (self.measures and self.every > 0 and step > 0):
            return False
        return step % self.every == 0 or (self.checkpoint_every > 0 and step % self.checkpoint_every == 0)

    def due(self, step: int) -> bool:
        return self.samples_due(step) or self.measure_due(step)

    def with_validation(self, validation: bool) -> EvalSchedule:
        """The same schedule once the data says whether there is a held-out set (an LLM job whose
        `data.val_fraction` held out no text)."""
        return replace(self, validation=validation)


def eval_schedule(cfg: JobConfig) -> EvalSchedule:
    """The schedule of `cfg`'s job kind. Sample prompts are required with `samples.every` (config)."""
    ev = cfg.eval
    samples_every = cfg.samples.every if cfg.samples.prompts else 0
    if cfg.model.kind == "llm":
        validation = bool(cfg.data.validation) or cfg.data.val_fraction > 0
        return EvalSchedule(samples_every, ev.every, ev.every > 0, validation, cfg.checkpoint.every)
    measures = ev.every > 0 or ev.val_dir is not None or bool(ev.prompts)
    return EvalSchedule(samples_every, ev.every, measures, ev.val_dir is not None, cfg.checkpoint.every)


__all__ = ["EvalSchedule", "eval_schedule"]
