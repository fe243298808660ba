"""`dallm export JOB --format peft --out DIR`: an LLM job's LoRA as a peft adapter folder.

The job's output folder and every checkpoint already hold `adapter_config.json` and
`adapter_model.safetensors` (peft's own names and keys); export copies them, so that
`PeftModel.from_pretrained(base_model, DIR)` loads the result on any machine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dallm.llm.trainer import ADAPTER_CONFIG, ADAPTER_WEIGHTS


def export_peft(src_dir: Path, out: Path) -> Path:
    """Copy the adapter of `src_dir` (an output or checkpoint folder) into the folder `out`."""
    src = Path(src_dir)
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (src / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{src}: no {' or '.join(missing)} (is this an LLM job's folder?)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        tmp = out / (name + ".tmp")
        shutil.copyfile(src / name, tmp)
        tmp.replace(out / name)
    return out
