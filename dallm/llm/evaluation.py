"""What plays KID's part for an LLM job: perplexities with a spread, and fixed-prompt generations.

`LlmEvaluator` has the image `LiveEvaluator`'s interface (`due`, `run`, `finish`, `result`,
`kid_on`, `samples_on`), so `dallm.engine.job.Job` runs it unchanged:
- perplexity (`dallm.micro_llm.metrics`: corpus perplexity, bootstrap std over texts) of the held-out
  target texts (`ppl_val`), the training texts (`ppl_train`) and base-distribution text
  (`ppl_base`: forgetting); the base model's own figures once, as `base_ppl_*`;
- generations for `samples.prompts` (greedy, or sampled per seed with `samples.temperature`),
  written to `samples/step-NNNNNN.txt` (the base model's to `samples/base.txt`) and sent as a
  `SampleEvent` carrying the texts.

The early-stop policy compares validation figures at evaluated steps (`monitor.select`); the image
loop hands it `kid_val`, and this evaluator hands it `ppl_val` itself (`attach`): lower is better
for both, so "best_val_kid" selects the lowest validation perplexity here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from dallm.config import JobConfig
from dallm.engine.checkpoint import TrainState
from dallm.eval.interface import Arrived, InLoopResults
from dallm.llm.data import Texts
from dallm.llm.model import LlmParts
from dallm.micro_llm.metrics import model_perplexity
from dallm.monitor.early_stop import EarlyStop
from dallm.protocol import Emit, LogEvent, MetricsEvent, Phase, PhaseEvent, SampleEvent

SETS = ("val", "train", "base")


def sample_file(step: int | None) -> str:
    return "samples/base.txt" if step is None else f"samples/step-{step:06d}.txt"


class LlmEvaluator(InLoopResults):
    def __init__(self, cfg: JobConfig, parts: LlmParts, texts: Texts, out_dir: Path, emit: Emit) -> None:
        self.cfg, self.parts, self.out_dir, self.emit = cfg, parts, Path(out_dir), emit
        self.sets = {"val": texts.validation, "train": texts.train, "base": texts.base}
        self.samples_on = cfg.samples.every > 0 and bool(cfg.samples.prompts)
        self.kid_on = cfg.eval.every > 0  # the name the loop asks for: "measures on a schedule"
        self.history: dict[int, dict[str, float]] = {}  # step -> ppl_* of that step
        self.base_values: dict[str, float] = {}
        self.sample_steps: list[int] = []
        self.eval_seconds: list[float] = []
        self.early: EarlyStop | None = None
        self.weights: Callable[[int], TrainState] | None = None
        self._arrived: list[Arrived] = []

    def attach(self, early: EarlyStop | None, weights: Callable[[int], TrainState]) -> None:
        """The early-stop policy to hand `ppl_val` to, and how to read the current weights."""
        self.early, self.weights = early, weights

    # -- schedule -------------------------------------------------------------------------------

    def samples_due(self, step: int) -> bool:
        return self.samples_on and step > 0 and step % self.cfg.samples.every == 0

    def ppl_due(self, step: int) -> bool:
        return self.kid_on and step > 0 and step % self.cfg.eval.every == 0

    def due(self, step: int) -> bool:
        return self.samples_due(step) or self.ppl_due(step)

    # -- the loop's interface (dallm.engine.job.Job): evaluated here, in the training process ----------

    def submit(self, step: int, weights: Callable[[int], TrainState]) -> None:
        """Evaluate what is due at `step` now (`collect` hands the values out). The perplexities
        reach the early-stop policy through `attach`, so the `Arrived` carries no weights."""
        self._arrived.append(Arrived(step, self.run(step)))

    def run(self, step: int) -> dict[str, float]:
        """Generations and/or perplexities of the current weights at `step`."""
        self.history = {s: v for s, v in self.history.items() if s < step}  # after a rollback + resume
        self.sample_steps = [s for s in self.sample_steps if s < step]
        values: dict[str, float] = {}
        if self.samples_due(step):
            self.samples(step)
        if self.ppl_due(step):
            values = self.evaluate(step)
            self._record(step, values, current=True)
        return values

    def _phase(self, phase: Phase, step: int) -> None:
        self.emit(PhaseEvent(phase=phase, step=step, at=time.time()))

    def _record(self, step: int, values: dict[str, float], current: bool) -> None:
        if self.early is not None and "ppl_val" in values:
            state = self.weights(step) if current and self.weights is not None else None
            self.early.record_kid(
                step, {"kid_val": values["ppl_val"], "kid_val_std": values["ppl_val_std"]}, state
            )

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
        if self.samples_on and final_step not in self.sample_steps:
            self.samples(final_step)
        if self.kid_on:
            if final_step in self.history:
                out.update(self.history[final_step])
            else:
                out.update(self.evaluate(final_step))
                self.emit(MetricsEvent(step=final_step, values=dict(out)))
                self._record(final_step, out, current=False)
        if self.eval_seconds:
            n, total = len(self.eval_seconds), sum(self.eval_seconds)
            self.emit(LogEvent(message=f"evaluation: {n} perplexity runs, {total / n:.2f} s each"))
        return out

    def result(self, result_step: int, turning_step: int | None, final_step: int) -> dict[str, float]:
        """Perplexities of the result weights (the caller loads them first) as result_ppl_*, and the
        turning point's as turning_ppl_* when it was evaluated."""
        if not self.kid_on:
            return {}
        res = self.history.get(result_step) or self.evaluate(result_step)
        out = {f"result_{k}": v for k, v in res.items() if k.startswith("ppl_")}
        at_tp = self.history.get(turning_step) if turning_step is not None else None
        if at_tp is not None:
            out.update({f"turning_{k}": v for k, v in at_tp.items() if k.startswith("ppl_")})
        return out
