"""Shutdown in JobLifecycle: running jobs are asked to checkpoint and get shutdown_timeout for it; a
second signal (`hurry`) kills them at the next loop turn."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from dallm.daemon.lifecycle import JobLifecycle
from dallm.protocol import InterruptCommand


@dataclass
class FakeScheduler:
    by_job: dict[int, str] = field(default_factory=lambda: {1: "w1", 2: "w2"})
    killed: list[tuple[str, int]] = field(default_factory=list)

    def kill(self, w: str, sig: int) -> None:
        self.killed.append((w, sig))


@dataclass
class FakeMessages:
    sent: list[tuple[str, object]] = field(default_factory=list)

    def command(self, w: str, cmd: object) -> None:
        self.sent.append((w, cmd))


def lifecycle(sched: FakeScheduler, messages: FakeMessages) -> JobLifecycle:
    unused = cast(Any, None)  # the store, event log and job service play no part in shutdown
    return JobLifecycle(unused, cast(Any, sched), unused, unused, cast(Any, messages), Path("."), 60.0)


def test_shutdown_asks_for_checkpoints_then_a_second_signal_kills() -> None:
    sched, messages = FakeScheduler(), FakeMessages()
    life = lifecycle(sched, messages)
    life.begin_shutdown()
    assert life.shutting_down
    assert [(w, type(c)) for w, c in messages.sent] == [("w1", InterruptCommand), ("w2", InterruptCommand)]
    assert not life.end_of_shutdown(time.time()) and sched.killed == []  # within the timeout: it waits
    life.begin_shutdown(hurry=True)
    assert len(messages.sent) == 2  # asked once
    assert not life.end_of_shutdown(time.time())
    assert sched.killed == [("w1", signal.SIGKILL), ("w2", signal.SIGKILL)]
    sched.by_job.clear()  # reaped
    assert life.end_of_shutdown(time.time())
