#!/usr/bin/env bash
# Issue 15's GPU figures in one command, at SD 1.5 shape (bench/sd15.py, random weights, 512 px),
# in about 8 minutes of device time: bench/bench_engine.py twice.
#   A: batch 1, 4, 8; bf16 autocast + channels-last, with fp32 and without channels-last beside it
#   B: batch 1, 8; bf16 + torch.compile, with eager beside it (compilation happens in the warm-up)
# Each run writes its table after every batch size, to $OUT (default runs/gpu_check): a run cut by
# its timeout keeps the batch sizes it finished.
#
#   here, once:          bench/gpu_wheels.sh                 (diffusers, pydantic... for the device)
#   a device session:    run(command="bench/gpu_check.sh", carry=[".whl"], timeout_s=590)
#   the CPU proof:       bench/gpu_check.sh --shape tiny --device cpu --steps 4 --warmup 1
# Arguments after the script's name are appended to both runs (the last of a repeated flag wins).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
if ! "$PY" -c "import diffusers, pydantic, tomli_w" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check: diffusers / pydantic missing and no .whl/: run bench/gpu_wheels.sh, then carry .whl" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Fail in seconds, not after loading models, when the image's packages do not fit dallm.
"$PY" - >"$OUT/env.txt" 2>&1 <<'PYEOF' || { cat "$OUT/env.txt"; exit 2; }
import sys; sys.path.insert(0, ".")
import torch, diffusers, transformers, peft, pydantic
from dallm.image.trainer import Trainer  # noqa: F401  (imports everything the step needs)
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}, pydantic {pydantic.__version__}; {gpu}")
PYEOF
cat "$OUT/env.txt"
SD15="--shape sd15 --rank 4"
timeout 300 "$PY" bench/bench_engine.py $SD15 --batch-sizes 1,4,8 --mixed-precision bf16 --channels-last \
  --steps 12 --block 3 --warmup 2 --out "$OUT/engine_bf16.md" "$@"
a=$?
timeout 270 "$PY" bench/bench_engine.py $SD15 --batch-sizes 1,8 --mixed-precision bf16 --compile \
  --ablate compile --steps 8 --block 2 --warmup 2 --out "$OUT/engine_compile.md" "$@"
b=$?
echo
for f in "$OUT/engine_bf16.md" "$OUT/engine_compile.md"; do [ -f "$f" ] && { cat "$f"; echo; }; done
echo "gpu_check: run A exit $a, run B exit $b (124: cut by its timeout); tables in $OUT"
[ "$a" = 0 ] && [ "$b" = 0 ]
