"""Modal screens: confirmations for stop/cancel, the rollback choice, and help."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class ConfirmScreen(ModalScreen[bool]):
    """Ask before an action that cannot be undone: `y`/Enter confirms, `n`/Esc declines."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str, confirm_label: str = "Yes") -> None:
        super().__init__()
        self.question = question
        self.confirm_label = confirm_label

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, classes="question")
            with Horizontal(classes="buttons"):
                yield Button(f"{self.confirm_label} (y)", variant="error", id="yes")
                yield Button("No (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class RollbackScreen(ModalScreen[str | None]):
    """Roll back to a step: finish there (`f`), or resume training from there (`r`)."""

    BINDINGS = [
        Binding("f", "answer('finish')", "Finish there"),
        Binding("r", "answer('resume')", "Resume from there"),
        Binding("n,escape", "answer(None)", "Back"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, classes="question")
            with Horizontal(classes="buttons"):
                yield Button("Finish there (f)", variant="warning", id="finish")
                yield Button("Resume (r)", variant="primary", id="resume")
                yield Button("Back (n)", id="back")

    def on_mount(self) -> None:
        self.query_one("#back", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None if event.button.id == "back" else event.button.id)

    def action_answer(self, answer: str | None) -> None:
        self.dismiss(answer)


HELP = """\
[b]dallm-tui[/b]: the jobs of one dallm daemon, live.

[b]Moving[/b]
  ↑ ↓          choose a job (the queue is in run order) or a checkpoint (in the list)
  tab          next pane        shift+tab  previous pane
  [ ]          older / newer sample grid (] past the last follows the latest)
  t            charts: CS-Fluctuation + KID (perplexity for LLM jobs)  /  loss + CS
  g            sample gallery: base, turning point and latest grids side by side

[b]Charts[/b] (both share the step window and the cursor)
  z Z          zoom in / out on steps          < >   pan left / right
  , .          cursor left / right: the legend reads the values at its step (click too)
  y            log / linear y-scale of the top chart (CS-Fluctuation starts on log)
  e            smoothing (EMA 0.6, 0.9, 0.99, off; the raw curve stays faint)
  0            the whole run again, cursor off

[b]Acting[/b] (each goes to the daemon; its answer shows in a notification and the log)
  s            early stop: finish now, with the turning-point weights when one was found
  r            roll back to the checkpoint chosen in the list: finish there, or resume from it
  c            checkpoint now: the running job writes a checkpoint at its next step
  X            cancel (shift+x, asks first): the worker is killed, no result is written;
               what it saved so far stays in its output folder
  + -          raise / lower the job's priority in the queue

[b]Views and the queue[/b]
  space        mark / unmark a job to compare    v  compare the marked jobs
  l            the worker log (f follow, / search)
  d            job details (e export)            u  resources (CPU, RAM, GPUs, jobs)
  /            search the queue    f  filter by state    o  sort    h  hide ended jobs
  C            clone the job with --set overrides
  T            dark / light theme                ctrl+p  command palette

  ?            this help          q  quit

The yellow ┊ in a chart marks the turning point (second valley of CS-Fluctuation). KID is
drawn with error bars (val: ± the std of the mean; train, base: ± the std over subsets) and ● on
each evaluation; KID < 0 is an unbiased estimate of "no difference" (the chart says so). The
queue's Val column is the validation measure (KID, or ppl for LLM jobs) ± the std of its mean.
Mouse: click a job, a checkpoint, a key in the footer; click the left/right half of the
thumbnail to step back/forward through the samples.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "app.pop_screen", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog help"):
            yield Static(HELP)
            yield Button("Close (esc)", id="close")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None)
