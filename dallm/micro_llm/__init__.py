"""The micro LLM: a miniature causal LM pretrained on a procedural corpus, and its teacher dialect.

- `MODEL_DIR`: the shipped model and tokenizer, a Hugging Face folder (`LlamaForCausalLM` and a
  word-level `PreTrainedTokenizerFast`) that `AutoModelForCausalLM.from_pretrained` and
  `AutoTokenizer.from_pretrained` load offline; its MANIFEST.json has the build's figures.
- `dallm.micro_llm.world`: the scenes, the base and teacher dialects, and the grammar checker.
- `dallm.micro_llm.data`: train/validation teacher text and base text, as lists or files.
- `dallm.micro_llm.metrics`: perplexity with a bootstrap spread (ppl_val, ppl_train, ppl_base).
- `dallm.micro_llm.build`: rebuilds the model (`dallm micro build-llm`).

Importing this package does not import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODEL_DIR: Path = HERE / "model"
MANIFEST_PATH: Path = MODEL_DIR / "MANIFEST.json"


def load(path: Path | str | None = None, device: Any = "cpu") -> tuple[Any, Any]:
    """The micro LLM (eval mode) and its tokenizer, from `path` (default: the shipped model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path) if path is not None else MODEL_DIR
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).to(device).eval()
    return model, AutoTokenizer.from_pretrained(folder, local_files_only=True)


__all__ = ["MODEL_DIR", "MANIFEST_PATH", "load"]
