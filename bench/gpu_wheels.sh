#!/usr/bin/env bash
# Wheels that the GPU machine's image lacks (diffusers, pydantic and its parts, tomli_w; see
# /work/.library/device/KINDS.md), at constraints.txt's versions, for its Python 3.12 x86-64, into
# .whl/ (in .gitignore; ~9 MB). transformers, peft, tokenizers and huggingface_hub are the image's own
# (transformers 5.17 there vs 5.23 here; a newer huggingface_hub would need packages it lacks).
# Run once here, then `run` the GPU check with carry [".whl"]; bench/gpu_check.sh installs them into
# /tmp/site when it finds .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
names="diffusers pydantic pydantic_core annotated-types typing-inspection typing_extensions tomli_w"
specs=()
for n in $names; do
  line=$(grep -i -E "^${n//[-_]/[-_]}==" constraints.txt) || { echo "gpu_wheels: $n is not in constraints.txt" >&2; exit 1; }
  specs+=("$line")
done
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${specs[@]}"
du -sh .whl && ls .whl
