#!/usr/bin/env bash
# The one prepared device check for a session that is lent a GPU (issue 3, item 8): the decode
# benchmark and the throughput benchmark on CUDA, at most 9 minutes (run it with timeout_s 600). Results go to
# $OUT (default: runs/gpu); copy the tables into BENCHMARKS.md with the machine and the date.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
#
# It needs a CUDA build of PyTorch (and transformers for the reference column) in $PY; dsv2 itself is
# taken from src/ so nothing has to be installed (the lent H200 image has torch + transformers).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
PY="${PY:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
timeout 240 "$PY" benchmarks/decode.py --device cuda --steps 20 --hf-steps 5 2>&1 | tee "$OUT/decode_cuda.txt"
for impl in fast gathered; do  # per-sequence attention loop vs one padded batch (launch-bound on a GPU?)
    timeout 150 "$PY" benchmarks/throughput.py --device cuda --kv-memory 64MiB --requests 512 --prompt-len 64 \
        --new-tokens 64 --decode-impl "$impl" 2>&1 | tee "$OUT/throughput_cuda_$impl.txt"
done
