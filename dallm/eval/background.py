"""Evaluation off the training path (`eval.mode = "background"`, the default for LoRA jobs).

`BackgroundEvaluator` wraps the training process's `LiveEvaluator` (the schedule, the history of
KIDs and samples, the final and result evaluations, the cost summary) and does its `Work` in a
process of its own: at an evaluation step it copies the trainable weights (UNet and text-encoder LoRA, the learned token rows: a few MB on SD 1.5) and sends
them to a process of its own (spawned; on the CPU it gets its own torch threads, on a GPU it uses
the same device), which loads the same base model with the same LoRA layers and tokens and runs the
ordinary `LiveEvaluator` on them. Training goes on meanwhile. The two talk in the typed messages
of `dallm.eval.messages`. The process answers in the order it
was asked, so results come back in step order; `collect()` hands them to the job, which puts them
into the metrics row of the step they belong to.

The trainer waits only where something needs the answer: the stop (a policy that compares
validation KIDs, the final evaluation, the result's KID), a checkpoint whose history must hold the
KIDs up to its step (a rollback waits too). While it waits the phase is "kid" and a log line says for
which steps. A process that dies or fails is an `EvaluationError` naming the pending steps, never a
hang: every wait polls the process.

Cost (eval/summary.json): `eval_share` counts only the trainer's own seconds (copying the weights,
waiting); `eval_worker_seconds` is the evaluator process's busy time, `eval_seconds_*` its KID runs.
"""

from __future__ import annotations

import contextlib
import os
import queue
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from dallm.config import JobConfig
from dallm.engine.checkpoint import TrainState
from dallm.eval.interface import Arrived, Weights, steps_text
from dallm.eval.kid import SampleCount
from dallm.eval.live import LiveEvaluator
from dallm.eval.messages import (
    EvalDone,
    EvalFailed,
    EvalForwarded,
    EvalReady,
    EvalReply,
    EvalRequest,
    RequestKind,
)
from dallm.eval.signals import measures_of
from dallm.image.models import ModelParts
from dallm.monitor.selection import EvidenceSet
from dallm.protocol import JobEvent, LogEvent, Phase, PhaseEvent, SampleEvent

_POLL_S = 0.2  # how often a waiting trainer checks that the evaluator process is alive


class EvaluationError(RuntimeError):
    """The background evaluator process failed or died; the message is one line."""


def evaluator_threads(cfg: JobConfig, device: torch.device) -> int:
    """The evaluator process's torch threads: `eval.threads`, else the cores training leaves (>= 1)."""
    if cfg.eval.threads is not None:
        return cfg.eval.threads
    if device.type != "cpu":
        return 1  # the work is on the accelerator
    from dallm.engine.threads import usable_cores

    return max(1, usable_cores() - torch.get_num_threads())


# -- the evaluator process ---------------------------------------------------------------------


def _load_weights(parts: ModelParts, tokens: Any, state: TrainState) -> None:
    from dallm.engine.lora import load_lora_state

    load_lora_state(parts.unet, state.lora)
    if state.text_encoder_lora is not None:
        load_lora_state(parts.text_encoder, state.text_encoder_lora)
    if state.token_rows is not None and tokens is not None:
        tokens.set_rows(state.token_rows)


def _next_request(requests: Any, parent: int) -> EvalRequest | None:
    """The next request; None (end) when asked to end or when the trainer `parent` is gone (a killed
    trainer cannot say so, and this process must not outlive it)."""
    while True:
        try:
            return requests.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                return None


def _watch_parent(parent: int) -> None:
    """End this process as soon as the trainer `parent` is gone, even while loading or evaluating."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="dallm-eval-parent-watch", daemon=True).start()


def worker_main(
    cfg: JobConfig,
    out_dir: Path,
    device: str,
    weight_dtype: torch.dtype,
    train_prompts: list[str],
    threads: int,
    requests: Any,
    replies: Any,
    parent: int,
) -> None:
    """The evaluator process: the base model with the job's LoRA layers and tokens, then one
    `EvalRequest` at a time, each answered by an `EvalDone` (`dallm.eval.messages`)."""
    step = None
    _watch_parent(parent)
    try:
        torch.set_num_threads(threads)
        from dallm.engine.lora import add_lora
        from dallm.image.models import load_parts
        from dallm.image.tokens import add_tokens

        parts = load_parts(cfg.model, device=device, weight_dtype=weight_dtype)
        if cfg.tokens.new or cfg.lora.text_encoder:  # as the trainer holds it (train.train)
            parts.text_encoder.to(torch.float32)
        # The same tokenizer ids and LoRA modules as the trainer's (rows and LoRA come with each request).
        tokens = add_tokens(parts.tokenizer, parts.text_encoder, cfg.tokens, torch.Generator())
        add_lora(parts.unet, parts.text_encoder, cfg.lora)

        def emit(event: JobEvent) -> None:
            if isinstance(event, SampleEvent | LogEvent):  # phases are the trainer's, not ours
                replies.put(EvalForwarded(event))

        t0 = time.perf_counter()
        ev = LiveEvaluator(cfg, parts, out_dir, emit, torch.device(device), weight_dtype, train_prompts)
        replies.put(EvalReady(time.perf_counter() - t0))
        while (req := _next_request(requests, parent)) is not None:
            step = req.step
            t0 = time.perf_counter()
            _load_weights(parts, tokens, req.state)
            values: dict[str, float] = {}
            if req.kind == "run":
                values = ev.run(step)
            elif req.kind == "kid":
                values = ev.evaluate(step)
            else:
                ev.samples(step)
            seconds = time.perf_counter() - t0
            count = ev.count.values() if ev.count is not None else {}  # eval.kid_std_target's choice
            replies.put(EvalDone(req.kind, step, values, seconds, ev.cache.hits, ev.cache.misses, count))
            step = None
    except BaseException as e:  # noqa: BLE001 - said to the trainer in one line, then this process ends
        first = (str(e).strip().splitlines() or [""])[0][:300]
        replies.put(EvalFailed(step, f"{type(e).__name__}: {first}"))


# -- the trainer's side ------------------------------------------------------------------------


class BackgroundEvaluator:
    """A `LiveEvaluator` whose samples and KIDs are made by a process of its own (see the module):
    the live one keeps the schedule and the records, this one is its `Work` and answers the loop."""

    def __init__(
        self,
        cfg: JobConfig,
        parts: ModelParts,
        out_dir: Path,
        emit: Callable[[JobEvent], None],
        device: torch.device,
        weight_dtype: torch.dtype,
        train_prompts: list[str],
        weights: Weights,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.live = LiveEvaluator(
            cfg, parts, out_dir, emit, device, weight_dtype, train_prompts,
            clock=clock, load_extractor=False, work=self,
        )  # fmt: skip
        self.cfg, self.emit, self.clock, self.weights = cfg, emit, clock, weights
        self.schedule = self.live.schedule
        self.validation_measure = self.live.validation_measure
        self._pending: deque[EvalRequest] = deque()
        self._answers: dict[tuple[str, int], dict[str, float]] = {}
        self._arrived: list[Arrived] = []
        self._trainer_seconds = 0.0  # copying weights and waiting: what eval_share counts
        self.wait_seconds = 0.0
        self.worker_seconds = 0.0  # the evaluator process's busy time (samples and KID)
        self.worker_setup_seconds = 0.0
        self.submits = 0
        ctx = torch.multiprocessing.get_context("spawn")
        self._requests, self._replies = ctx.Queue(), ctx.Queue()
        threads = evaluator_threads(cfg, torch.device(device))
        self._proc = ctx.Process(
            target=worker_main,
            args=(
                cfg,
                self.live.out_dir,
                str(device),
                weight_dtype,
                list(train_prompts),
                threads,
                self._requests,
                self._replies,
                os.getpid(),
            ),  # fmt: skip
            name="dallm-eval",
            daemon=True,  # never outlives the trainer
        )
        self._proc.start()

    # -- the loop's requests ---------------------------------------------------------------------

    def due(self, step: int) -> bool:
        return self.schedule.due(step)

    def submit(self, step: int, weights: Weights) -> None:
        """Send a copy of the weights of `step` to be evaluated (samples and/or KID as due)."""
        t0 = self.clock()
        self.live.forget_from(step)
        self._send("run", step, weights(step))
        self._trainer_seconds += self.clock() - t0
        self.submits += 1

    def _send(self, kind: RequestKind, step: int, state: TrainState) -> None:
        request = EvalRequest(kind, step, state)
        self._pending.append(request)
        self._requests.put(request)

    def pending(self) -> list[int]:
        return [r.step for r in self._pending]

    def collect(self, wait_upto: int | None = None) -> list[Arrived]:
        """Finished evaluations in step order; with `wait_upto`, first wait for those up to that step."""
        if wait_upto is not None:
            self._wait(lambda: not any(s <= wait_upto for s in self.pending()), f"up to step {wait_upto}")
        while self._receive(None):
            pass
        out, self._arrived = self._arrived, []
        return out

    def finish(self, final_step: int) -> dict[str, float]:
        """`LiveEvaluator.finish`, after every evaluation asked for has come back (the job collects
        them first, so that they reach their metric rows and the early-stop policy)."""
        self._wait(lambda: not self._pending, "everything asked for")
        return self.live.finish(final_step)

    def result(
        self,
        result_step: int,
        turning_step: int | None,
        final_step: int,
        result_weights: AbstractContextManager[None],
    ) -> dict[str, float]:
        return self.live.result(result_step, turning_step, final_step, result_weights)

    def summary(self) -> dict[str, float]:
        return self.live.summary()

    def evidence(self, steps: list[int]) -> EvidenceSet | None:
        """The live evaluator's: the process keeps the evidence in the job's folder (eval/evidence)."""
        return self.live.evidence(steps)

    def close(self) -> None:
        """Ask the process to end; one that does not within a few seconds is terminated."""
        if self._proc.is_alive():
            with contextlib.suppress(OSError, ValueError):  # a queue already closed
                self._requests.put(None)
            self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=5)
        self._requests.close()
        self._replies.close()

    # -- the live evaluator's `Work`, done by the process ----------------------------------------

    def evaluate(self, step: int) -> dict[str, float]:
        """KID of the weights held now (final step, result), recorded under `step`; waits for it."""
        values = self._ask("kid", step)
        self.live.kid_history[step] = values
        return values

    def samples(self, step: int) -> None:
        self._ask("samples", step)
        self.live.sample_steps.append(step)

    def _ask(self, kind: RequestKind, step: int) -> dict[str, float]:
        self._send(kind, step, self.weights(step))
        self._wait(lambda: (kind, step) in self._answers, f"the final {kind} of step {step}")
        return self._answers.pop((kind, step))

    def trainer_seconds(self) -> float:
        return self._trainer_seconds

    def work_summary(self) -> dict[str, float]:
        return {
            "eval_worker_seconds": self.worker_seconds,
            "eval_worker_setup_seconds": self.worker_setup_seconds,
            "eval_wait_seconds": self.wait_seconds,
        }

    # -- answers ---------------------------------------------------------------------------------

    def _phase(self, phase: Phase, step: int) -> None:
        self.emit(PhaseEvent(phase=phase, step=step, at=time.time()))

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        """Wait (phase "kid") until `done()`; the time counts as the trainer's evaluation time."""
        while self._receive(None):  # what has arrived already may be enough
            pass
        if done():
            return
        t0 = self.clock()
        step = self._pending[0].step if self._pending else 0
        self._phase("kid", step)
        self.emit(
            LogEvent(
                message=f"waiting for the background evaluation ({what}; pending: {steps_text(self.pending())})"
            )
        )
        while not done():
            self._receive(_POLL_S)
        dt = self.clock() - t0
        self._trainer_seconds += dt
        self.wait_seconds += dt

    def _receive(self, timeout: float | None) -> bool:
        """Handle one message (`timeout` None: only one already there); False when none came."""
        try:
            msg: EvalReply = self._replies.get(timeout=timeout) if timeout else self._replies.get_nowait()
        except queue.Empty:
            if not self._proc.is_alive() and self._pending:
                raise EvaluationError(
                    f"the background evaluation process died (exit code {self._proc.exitcode}) with step(s) "
                    f'{self.pending()} pending; eval.mode = "inline" evaluates in the training process'
                ) from None
            return False
        match msg:
            case EvalForwarded(event):
                self.emit(event)
            case EvalReady(seconds):
                self.worker_setup_seconds = seconds
            case EvalFailed(step, error):
                at = f" at step {step}" if step is not None else " while starting"
                raise EvaluationError(f"background evaluation failed{at}: {error}")
            case EvalDone():
                self._done(msg)
        return True

    def _done(self, msg: EvalDone) -> None:
        request = self._pending.popleft()  # answered in the order asked
        live, step, values, seconds = self.live, msg.step, msg.values, msg.seconds
        self.worker_seconds += seconds
        live.cache.hits, live.cache.misses = msg.cache_hits, msg.cache_misses
        if msg.count and live.count is None:  # for eval/summary.json (the process logged it already)
            live.count = SampleCount.from_values(
                msg.count, "eval.val_dir" if self.cfg.eval.val_dir else "data.dir"
            )
        if "kid_val" in values or "kid_train" in values:
            live.eval_seconds.append(seconds)
        if msg.kind != "run":
            if msg.kind == "samples":
                live.sample_seconds += seconds
            self._answers[(msg.kind, step)] = values
            return
        if self.schedule.samples_due(step):
            live.sample_steps.append(step)
        if self.schedule.measure_due(step):
            live.kid_history[step] = measures_of(values)
        values = dict(values)
        values["eval_worker_seconds"] = values.pop("eval_seconds", seconds)
        # What the trainer stops for per evaluation (the ETA counts it): copying the weights, waits.
        values["eval_stop_seconds"] = self._trainer_seconds / max(1, self.submits)
        values["eval_share"] = live.share()
        kept = request.state if self.schedule.measure_due(step) else None
        self._arrived.append(Arrived(step, values, kept))


__all__ = ["BackgroundEvaluator", "EvaluationError", "evaluator_threads", "worker_main"]
