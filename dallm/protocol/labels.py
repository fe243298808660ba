"""How a job's figures are named where people read them (log lines, `dallm ls`/`show`, the TUI):
the validation measure by the job's kind (KID for an image job, perplexity for an LLM job), and
which spread a `±` is (every validation `±` is the std of the mean: KID by a bootstrap over
references and samples, perplexity by a bootstrap over texts)."""

from __future__ import annotations

from dallm.protocol.jobs import JobSummary

SPREAD = "± std of the mean"
MEASURE_NAMES = {"kid_val": "validation KID", "ppl_val": "validation perplexity"}
SHORT = {"image": "KID", "llm": "ppl"}


def measure_label(name: str | None) -> str:
    """The validation measure's name in words ("kid_val" -> "validation KID")."""
    if name is None:
        return "validation measure"
    return MEASURE_NAMES.get(name, name)


def short_measure(kind: str | None) -> str:
    """The measure's short name for a job kind (image until the engine says)."""
    return SHORT.get(kind or "image", "KID")


def value_text(value: float | None, std: float | None = None, digits: int = 4) -> str:
    """A figure with its spread when known ("0.0123±0.004"); "-" when unmeasured."""
    if value is None:
        return "-"
    text = f"{value:.{digits}g}" if abs(value) >= 10 else f"{value:.{digits}f}"
    return text if std is None else f"{text}±{std:.2g}"


def fidelity_text(fidelity: float | None, base: float | None) -> str:
    """Prompt fidelity on held-out prompts beside the base model's ("0.85 (base 0.97)")."""
    if fidelity is None:
        return "-"
    return f"{fidelity:.2f}" + (f" (base {base:.2f})" if base is not None else "")


def validation_text(s: JobSummary) -> str:
    """The job's validation measure by its kind, with its spread: "KID 0.0123±0.004", "ppl 12.3±0.5"."""
    value, std = (s.validation, s.validation_std) if s.validation is not None else (s.kid_val, s.kid_val_std)
    return (
        "-" if value is None else f"{short_measure(s.kind)} {value_text(value, std)}"
    )  # kid_val: older rows


def figures_lines(s: JobSummary) -> list[str]:
    """The validation figures of a job, one a line, each spread named (`dallm show`, the TUI's details)."""
    out = []
    if s.validation is not None or s.kid_val is not None:
        name = measure_label(s.validation_measure or ("ppl_val" if s.kind == "llm" else "kid_val"))
        has_std = (s.validation_std if s.validation is not None else s.kid_val_std) is not None
        out.append(f"{name}: {validation_text(s)}" + (f" ({SPREAD})" if has_std else ""))
    if s.val_loss is not None:
        out.append(f"validation loss: {value_text(s.val_loss)} (fixed timesteps and noise)")
    if s.fidelity is not None:
        out.append(f"prompt fidelity (held-out prompts): {fidelity_text(s.fidelity, s.base_fidelity)}")
    if s.selection:
        out.append(f"result chosen by {s.selection}")
    return out


__all__ = [
    "figures_lines",
    "validation_text",
    "MEASURE_NAMES",
    "SPREAD",
    "fidelity_text",
    "measure_label",
    "short_measure",
    "value_text",
]
