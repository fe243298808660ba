"""The keys that act on the selected job through the daemon: stop, cancel, checkpoint, rollback and
priority, confirmed first where they cannot be undone, sent from thread workers; the daemon's answer
comes back as `ActionAnswered` (a notification and a line in the activity log).

`JobActions` is a base class of the app (tui/app.py's `DallmApp`, through views/actions.py's
`ViewActions`), which provides what it declares under TYPE_CHECKING: this module does not import
the app.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from textual.message import Message

from dallm.protocol import TERMINAL_STATES, JobSummary, kid_text
from dallm.tui.connection import Action, ActionResult, Connection, ConnectionLost
from dallm.tui.screens import ConfirmScreen, RollbackScreen
from dallm.tui.widgets import ActivityLog, CheckpointList

if TYPE_CHECKING:
    from textual.app import App

    from dallm.tui.feed import DaemonFeed
    from dallm.tui.model import Model

    _Base = App[None]
else:
    _Base = object


class JobActions(_Base):
    """Stop, cancel, checkpoint, rollback, priority; `send` for every request to the daemon."""

    if TYPE_CHECKING:  # provided by DallmApp
        connection: Connection
        model: Model
        feed: DaemonFeed
        selected: int | None

    class ActionAnswered(Message):
        """The daemon answered (or could not be asked) a request made from the keyboard."""

        def __init__(self, action: Action, result: ActionResult) -> None:
            super().__init__()
            self.action, self.result = action, result

    def selected_row(self, verb: str) -> JobSummary | None:
        """The selected job's row, or None after telling the user there is none to `verb`."""
        row = self.model.jobs.get(self.selected) if self.selected is not None else None
        if row is None:
            self.notify(f"no job to {verb}", severity="warning")
        return row

    def _unfinished_row(self, verb: str) -> JobSummary | None:
        """`selected_row`, or None after telling the user its job has ended already."""
        row = self.selected_row(verb)
        if row is not None and row.state in TERMINAL_STATES:
            self.notify(f"{row.id} is already {row.state}", severity="warning")
            return None
        return row

    def action_stop(self) -> None:
        row = self._unfinished_row("stop")
        if row is None:
            return
        data = self.model.data.get(row.id)
        tp = data.turning_point if data else row.turning_point
        weights = f"the turning-point weights (step {tp})" if tp is not None else "the current weights"
        question = f"Stop job {row.id} ({row.name}) now?\nIt finishes with {weights}."
        self.push_screen(ConfirmScreen(question, "Stop"), partial(self._confirmed, Action("stop", row.id)))

    def action_cancel_job(self) -> None:
        row = self._unfinished_row("cancel")
        if row is None:
            return
        where = row.out_dir or "its output folder"
        question = (
            f"Cancel job {row.id} ({row.name})?\nIts worker is killed now and no result weights are "
            f"written; what it saved so far (checkpoints, samples, metrics) stays in {where}."
        )
        self.push_screen(
            ConfirmScreen(question, "Cancel job"), partial(self._confirmed, Action("cancel", row.id))
        )

    def action_checkpoint(self) -> None:
        row = self.selected_row("checkpoint")
        if row is None:
            return
        if row.state != "running":
            self.notify(
                f"{row.id} is {row.state}: only a running job writes a checkpoint", severity="warning"
            )
            return
        self.send(Action("checkpoint", row.id))  # harmless: no confirmation

    def action_rollback(self) -> None:
        row = self.selected_row("roll back")
        if row is None:
            return
        step = self.query_one(CheckpointList).chosen_step
        if step is None:
            self.notify("no checkpoint chosen: pick one in the checkpoint list", severity="warning")
            return
        history = self.model.history(row.id)
        value, std = history.validation_at(step) if history else (None, None)
        note = f" ({history.measure.label} {kid_text(value, std)})" if history and value is not None else ""
        question = f"Roll job {row.id} ({row.name}) back to step {step}{note}?\nFinish there, or resume training from it?"

        def answered(choice: str | None) -> None:
            if choice is not None:
                self.send(Action("rollback", row.id, step=step, resume=choice == "resume"))

        self.push_screen(RollbackScreen(question), answered)

    def action_priority(self, delta: int) -> None:
        row = self.selected_row("reprioritise")
        if row is not None:
            self.send(Action("priority", row.id, priority=row.priority + delta))

    def _confirmed(self, action: Action, yes: bool | None) -> None:
        if yes:
            self.send(action)

    def send(self, action: Action) -> None:
        """Send `action` from a thread worker; the answer comes back as `ActionAnswered`."""
        self.query_one(ActivityLog).note(f"→ {action.describe()}")
        self.run_worker(
            partial(self._send_blocking, action), thread=True, group="actions", exit_on_error=False
        )

    def _send_blocking(self, action: Action) -> None:
        try:
            result = self.connection.send(action)
        except ConnectionLost as e:
            result = ActionResult(False, f"not sent: {e}")
        except Exception as e:
            result = ActionResult(False, f"{type(e).__name__}: {e}")
        self.post_message(self.ActionAnswered(action, result))

    def on_job_actions_action_answered(self, message: ActionAnswered) -> None:
        ok, text = message.result.ok, message.result.message
        self.notify(text, title=message.action.describe(), severity="information" if ok else "error")
        self.query_one(ActivityLog).note(("✓ " if ok else "✗ ") + text, style="green" if ok else "bold red")
        self.feed.refresh_jobs()
