"""Clone a job: its resolved config resubmitted with `--set` overrides typed in a dialog."""

from __future__ import annotations

import shlex

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static


def parse_overrides(text: str) -> list[str]:
    """`a.b=1 c="x y"` -> ["a.b=1", "c=x y"]; ValueError names an item that is not KEY=VALUE."""
    try:
        items = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"overrides: {e}") from None
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ValueError(f"override {item!r}: give KEY=VALUE, e.g. train.steps=200")
    return items


class CloneScreen(ModalScreen[list[str] | None]):
    """Asks for the overrides; dismisses with the `--set` items, or None (escape)."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Back")]

    def __init__(self, job: int, name: str) -> None:
        super().__init__()
        self.job, self.job_name = job, name

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog clone"):
            yield Static(
                f"Clone job {self.job} ({self.job_name}) with overrides (--set KEY=VALUE, space "
                "separated; empty: the same config).\nThe clone gets its own output folder.",
                classes="question",
            )
            yield Input(placeholder="train.steps=200 lora.rank=8", id="clone-overrides")
            yield Static(id="clone-error")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        try:
            items = parse_overrides(event.value)
        except ValueError as e:
            self.query_one("#clone-error", Static).update(f"[b red]{e}[/]")
            return
        self.dismiss(items)
