"""Messages between a worker process and the daemon (the worker's DEALER, the daemon's ROUTER).

worker -> daemon  [WORKER_EVENT, b"<unix time>", json JobEvent, png?]   engine events (the bulk)
                  [WORKER_MESSAGE, json WorkerMessage]                 hello, done, error
daemon -> worker  [json JobCommand]
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from dallm.protocol.events import JobResult, Message

MAX_WORKER_BYTES = 64 << 20
WORKER_EVENT = b"ev"
WORKER_MESSAGE = b"msg"


class WorkerHello(Message):
    kind: Literal["hello"] = "hello"
    job: int
    attempt: int
    pid: int


class WorkerDone(Message):
    """The engine returned."""

    kind: Literal["done"] = "done"
    result: JobResult


class WorkerError(Message):
    """The engine raised: `category` is oom, nan, disk_full or error; `message` is one line."""

    kind: Literal["error"] = "error"
    category: Literal["oom", "nan", "disk_full", "error"]
    message: str
    traceback: str = ""


WorkerMessage = Annotated[WorkerHello | WorkerDone | WorkerError, Field(discriminator="kind")]
worker_message_adapter: TypeAdapter[WorkerMessage] = TypeAdapter(WorkerMessage)
