"""The messages between the trainer and its background evaluation process (`dallm.eval.background`),
each a small frozen dataclass (they travel pickled through multiprocessing queues, weights included).

Trainer -> process: `EvalRequest` (None ends the process).
Process -> trainer: `EvalReady` once loaded, `EvalForwarded` for each sample grid or log line it
makes, `EvalDone` per request in the order asked, `EvalFailed` once, as its last word.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dallm.engine.checkpoint import TrainState
from dallm.protocol import LogEvent, SampleEvent

# "run": what is due at the step (samples and/or KID); "kid" / "samples": one of them, asked for at
# the end (the stop step, the result), when the weights the trainer holds are not a scheduled step's.
RequestKind = Literal["run", "kid", "samples"]


@dataclass(frozen=True)
class EvalRequest:
    kind: RequestKind
    step: int
    state: TrainState  # the weights to evaluate (a copy of the trainable ones)


@dataclass(frozen=True)
class EvalReady:
    seconds: float  # loading the model, the LoRA layers and the feature extractor


@dataclass(frozen=True)
class EvalForwarded:
    event: SampleEvent | LogEvent  # for the trainer to emit as its own (phases are the trainer's)


@dataclass(frozen=True)
class EvalDone:
    kind: RequestKind
    step: int
    values: dict[str, float]
    seconds: float  # the process's busy time for this request
    cache_hits: int  # the feature cache's counters so far (eval/summary.json)
    cache_misses: int
    count: dict[str, float] = field(default_factory=dict)  # eval.kid_std_target's choice, once made


@dataclass(frozen=True)
class EvalFailed:
    step: int | None  # None: while starting
    error: str  # one line: "TypeName: first line of the message"


EvalReply = EvalReady | EvalForwarded | EvalDone | EvalFailed

__all__ = [
    "EvalDone",
    "EvalFailed",
    "EvalForwarded",
    "EvalReady",
    "EvalReply",
    "EvalRequest",
    "RequestKind",
]
