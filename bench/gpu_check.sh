#!/usr/bin/env bash
# One prepared GPU check (about 8 minutes on one GPU with the wheels cached): a fresh venv with onnxruntime-gpu,
# the real 0.5B exported in the GPU precision (int4 weights, fp16 activations, seqlens attention) and in fp16, the
# tests marked `cuda`, then one table: prefill and decode tok/s, time to first token, GPU memory and parity.
#
#   bash bench/gpu_check.sh            # WORK=/tmp/qwen2-gpu-check; VENV=path reuses a venv that has the onnx-gpu extra
#
# Without an NVIDIA GPU it runs what it can (venv, exports, the tests, which skip with their reason) and says
# plainly that the CUDA figures could not be measured; it exits 3 then. On a CUDA machine pip may resolve
# torch==2.13.0 to a CUDA build of several GB: the reference needs the CPU build only, so point pip at PyTorch's
# CPU wheels first (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu) if the machine can reach them.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/qwen2-gpu-check}
mkdir -p "$WORK"
start=$SECONDS
say() { printf '\n== [%s s] %s\n' "$((SECONDS - start))" "$*"; }

if nvidia-smi -L >/dev/null 2>&1; then
    GPU=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
    say "GPU: $GPU"
else
    GPU=""
    say "NO GPU: nvidia-smi finds no NVIDIA GPU on this machine. The steps that need CUDA will say so; the CUDA figures stay unmeasured."
fi

if [ -n "${VENV:-}" ]; then
    say "using the venv $VENV"
else
    VENV=$WORK/venv
    say "making a venv with onnxruntime-gpu in $VENV (pip install torch==2.13.0, then -e .[onnx-gpu])"
    python3.11 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q -e ".[onnx-gpu]" "pytest>=8" "hypothesis>=6.100,<7"
fi
PY=$VENV/bin/python
if "$PY" -c "import onnxruntime" 2>/dev/null && "$PY" -m pip show -q onnxruntime >/dev/null 2>&1 \
        && "$PY" -m pip show -q onnxruntime-gpu >/dev/null 2>&1; then
    echo "gpu_check: $VENV has both onnxruntime and onnxruntime-gpu; they overwrite each other: use a fresh venv" >&2
    exit 2
fi
"$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, 'providers:', ', '.join(o.get_available_providers()))"

say "exporting the real 0.5B for the H100 profile: --dtype int4 (fp16 activations, seqlens attention), then fp16"
"$PY" -m export onnx --size 0.5b --device h100 --dtype int4 --out "$WORK/exports/int4" --overwrite
"$PY" -m export onnx --size 0.5b --device h100 --dtype fp16 --out "$WORK/exports/fp16" --overwrite

say "the tests marked cuda (each skip names its reason)"
QWEN2_GPU_EXPORTS=$WORK/exports "$PY" -m pytest -q -rs -m cuda tests/test_cuda.py

if [ -z "$GPU" ]; then
    say "NO GPU: the table needs CUDA (decode and prefill on the GPU, GPU memory); it was not measured. The exports above were gated on ONNX Runtime's CPU provider (the CPU twin): for its figures run"
    echo "    $PY bench/gpu.py $WORK/exports/int4 $WORK/exports/fp16 --device cpu"
    exit 3
fi
say "the table (CUDA)"
"$PY" bench/gpu.py "$WORK/exports/int4" "$WORK/exports/fp16" --device cuda
echo "GPU: $GPU; $(nproc) CPU cores; total $((SECONDS - start)) s"
