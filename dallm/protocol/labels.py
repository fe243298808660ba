"""How a job's figures are named where people read them (log lines, `dallm ls`/`show`, the TUI):
the validation measure by the job's kind (KID for an image job, perplexity for an LLM job), and
which spread a `±` is (every validation `±` is the std of the mean: KID by a bootstrap over
references and samples, perplexity by a bootstrap over texts)."""

from __future__ import annotations

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


__all__ = ["MEASURE_NAMES", "SPREAD", "fidelity_text", "measure_label", "short_measure", "value_text"]
