"""What plays KID's part for an LLM job: perplexities with a spread, and fixed-prompt generations.

`LlmEvaluator` is a `dallm.eval.interface.Evaluator`, as the image `LiveEvaluator` is, so
`dallm.engine.job.Job` runs it unchanged (`dallm.eval.schedule.EvalSchedule` says what is due):
- perplexity (`dallm.micro_llm.metrics`: corpus perplexity, bootstrap std over texts) of the held-out
  target texts (`ppl_val`), the training texts (`ppl_train`) and base-distribution text
  (`ppl_base`: forgetting); the base model's own figures once, as `base_ppl_*`;
- generations for `samples.prompts` (greedy, or sampled per seed with `samples.temperature`),
  written to `samples/step-NNNNNN.txt` (the base model's to `samples/base.txt`) and sent as a
  `SampleEvent` carrying the texts.

The early-stop policy compares the validation measure at evaluated steps (`monitor.select`): the
loop hands it this evaluator's `validation_measure`, `ppl_val` (an image job's is `kid_val`); lower
is better for both, so "best_val_kid" selects the lowest validation perplexity here.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dallm.config import JobConfig
from dallm.eval.interface import Arrived, InLoopResults, Weights
from dallm.eval.schedule import EvalSchedule
from dallm.llm.data import Texts
from dallm.llm.model import LlmParts
from dallm.micro_llm.metrics import model_perplexity
from dallm.protocol import Emit, LogEvent, MetricsEvent, Phase, PhaseEvent, SampleEvent

SETS = ("val", "train", "base")


def sample_file(step: int | None) -> str:
    return "samples/base.txt" if step is None else f"samples/step-{step:06d}.txt"


if TYPE_CHECKING:
    from dallm.monitor.selection import EvidenceSet


class LlmEvaluator(InLoopResults):
    validation_measure = "ppl_val"

    def __init__(
        self, cfg: JobConfig, parts: LlmParts, texts: Texts, out_dir: Path, emit: Emit, schedule: EvalSchedule
    ) -> None:
        self.cfg, self.parts, self.out_dir, self.emit = cfg, parts, Path(out_dir), emit
        self.sets = {"val": texts.validation, "train": texts.train, "base": texts.base}
        self.schedule = schedule
        self.history: dict[int, dict[str, float]] = {}  # step -> ppl_* of that step
        self.base_values: dict[str, float] = {}
        self.sample_steps: list[int] = []
        self.eval_seconds: list[float] = []
        self._arrived: list[Arrived] = []

    # -- the loop's interface (dallm.engine.job.Job): evaluated here, in the training process ----------

    def due(self, step: int) -> bool:
        return self.schedule.due(step)

    def submit(self, step: int, weights: Weights) -> None:
        """Evaluate what is due at `step` now (`collect` hands the values out), with the weights
        when early stopping may return them."""
        values = self.run(step)
        keep = self.validation_measure in values
        self._arrived.append(Arrived(step, values, weights(step) if keep else None))

    def run(self, step: int) -> dict[str, float]:
        """Generations and/or perplexities of the current weights at `step`."""
        self.history = {s: v for s, v in self.history.items() if s < step}  # after a rollback + resume
        self.sample_steps = [s for s in self.sample_steps if s < step]
        values: dict[str, float] = {}
        if self.schedule.samples_due(step):
            self.samples(step)
        if self.schedule.measure_due(step):
            values = self.evaluate(step)
        return values

    def _phase(self, phase: Phase, step: int) -> None:
        self.emit(PhaseEvent(phase=phase, step=step, at=time.time()))

    # -- perplexities ---------------------------------------------------------------------------

    def _perplexities(self, prefix: str) -> dict[str, float]:
        out: dict[str, float] = {}
        bs, seed = self.cfg.eval.batch_size, self.cfg.seed
        for name in SETS:
            if self.sets[name]:
                p = model_perplexity(self.parts.model, self.parts.tokenizer, self.sets[name], bs, seed=seed)
                out[f"{prefix}ppl_{name}"], out[f"{prefix}ppl_{name}_std"] = p.value, p.std
        return out

    def evaluate(self, step: int) -> dict[str, float]:
        """ppl_val / ppl_train / ppl_base (each with _std) of the current weights, and the base
        model's own (base_ppl_*, measured once with the adapter off)."""
        self._phase("kid", step)
        t0 = time.perf_counter()
        if not self.base_values:
            with self.parts.model.disable_adapter():
                self.base_values = self._perplexities("base_")
        values = self._perplexities("") | self.base_values
        self.history[step] = values
        self.eval_seconds.append(time.perf_counter() - t0)
        values["eval_seconds"] = self.eval_seconds[-1]
        values["eval_stop_seconds"] = sum(self.eval_seconds) / len(self.eval_seconds)
        return values

    def evidence(self, steps: list[int]) -> EvidenceSet | None:
        """For monitor.select = "evidence": ppl_val is each evaluated step's validation loss (no KID
        and no prompt fidelity for text: the selection falls to the lowest validation loss)."""
        from dallm.monitor.selection import Evidence, EvidenceSet

        rows = [
            Evidence(s, val_loss=self.history[s]["ppl_val"])
            for s in steps
            if "ppl_val" in self.history.get(s, {})
        ]
        return EvidenceSet(rows, None, None) if rows else None

    # -- generations ----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self) -> list[str]:
        """One continuation per prompt and seed (one per prompt when greedy), prompt included."""
        sc, tok, model = self.cfg.samples, self.parts.tokenizer, self.parts.model
        device = next(p for p in model.parameters()).device
        seeds = sc.seeds if sc.temperature > 0 else [None]
        out = []
        was_training = model.training
        model.eval()
        try:
            for prompt in sc.prompts:
                ids = tok(prompt, return_tensors="pt").input_ids.to(device)
                for seed in seeds:
                    if seed is not None:
                        torch.manual_seed(seed)  # the loop isolates the training RNG around evaluation
                    kw = (
                        {"do_sample": True, "temperature": sc.temperature}
                        if seed is not None
                        else {"do_sample": False}
                    )
                    gen = model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=sc.max_new_tokens,
                        pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id,
                        **kw,
                    )
                    out.append(tok.decode(gen[0], skip_special_tokens=True).strip())
        finally:
            model.train(was_training)
        return out

    def _write(self, step: int | None, texts: list[str]) -> str:
        rel = sample_file(step)
        path = self.out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(t.replace("\n", " ") + "\n" for t in texts), encoding="utf-8")
        tmp.replace(path)
        return rel

    def samples(self, step: int) -> None:
        self._phase("sampling", step)
        if not self.sample_steps and not (self.out_dir / sample_file(None)).exists():
            with self.parts.model.disable_adapter():
                self._write(None, self.generate())
        texts = self.generate()
        rel = self._write(step, texts)
        self.sample_steps.append(step)
        self.emit(SampleEvent(step=step, path=rel, prompts=list(self.cfg.samples.prompts), texts=texts))

    # -- the end --------------------------------------------------------------------------------

    def finish(self, final_step: int) -> dict[str, float]:
        """Generations and perplexities of the stop step (unless made there already)."""
        out: dict[str, float] = {}
        if self.schedule.samples_on and final_step not in self.sample_steps:
            self.samples(final_step)
        if self.schedule.measures:
            if final_step in self.history:
                out.update(self.history[final_step])
            else:
                out.update(self.evaluate(final_step))
                self.emit(MetricsEvent(step=final_step, values=dict(out)))
        if self.eval_seconds:
            n, total = len(self.eval_seconds), sum(self.eval_seconds)
            self.emit(LogEvent(message=f"evaluation: {n} perplexity runs, {total / n:.2f} s each"))
        return out

    def result(
        self,
        result_step: int,
        turning_step: int | None,
        final_step: int,
        result_weights: AbstractContextManager[None],
    ) -> dict[str, float]:
        """Perplexities of the result weights (`result_weights` holds them in the model while
        measured) as result_ppl_*, and the turning point's as turning_ppl_* when it was evaluated."""
        if not self.schedule.measures:
            return {}
        res = self.history.get(result_step)
        if not res:
            with result_weights:
                res = self.evaluate(result_step)
        out = {f"result_{k}": v for k, v in res.items() if k.startswith("ppl_")}
        at_tp = self.history.get(turning_step) if turning_step is not None else None
        if at_tp is not None:
            out.update({f"turning_{k}": v for k, v in at_tp.items() if k.startswith("ppl_")})
        return out
