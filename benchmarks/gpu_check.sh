#!/usr/bin/env bash
# One GPU call: the kernels against their torch references, then sfi vs FlashInfer on real sglang
# (decode CUDA graphs on). usage: bash benchmarks/gpu_check.sh OUTDIR
# Needs sglang 0.5.17 and sfi-sglang installed (see README, offline install). Speed: bench_decode.py.
set -u
OUT=${1:?outdir}
mkdir -p "$OUT"; export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
HERE=$(cd "$(dirname "$0")/.." && pwd)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"

python -m pytest -q -p no:cacheprovider "$HERE/tests/kernel" "$HERE/tests/backend/test_backend_select.py" \
  "$HERE/tests/backend/test_metrics.py" \
  > "$OUT/kernel_tests.log" 2>&1
echo "kernel tests rc=$? ($(tail -1 "$OUT/kernel_tests.log"))"

python -m sfi_sglang.dummy_model /tmp/sfi-small --preset small --random-weights > /dev/null 2>&1
# budget >= context: sfi must give flashinfer's tokens
SFI_CONFIG='{"topk": 32768, "max_fast_steps": 8, "min_refresh_gap": 4, "log_interval": 20}' \
  timeout 300 python "$HERE/tests/serving/engine_compare.py" /tmp/sfi-small flashinfer --load-format auto \
  --prompts 4 --prompt-len 1500 --new-tokens 48 --log-level info > "$OUT/compare_full.log" 2>&1
echo "compare_full rc=$?"
# default budget on a 6K prompt: agreement is informational (random weights)
SFI_CONFIG='{"topk": 1024, "log_interval": 20}' \
  timeout 300 python "$HERE/tests/serving/engine_compare.py" /tmp/sfi-small flashinfer --load-format auto \
  --prompts 4 --prompt-len 6000 --new-tokens 64 --log-level info > "$OUT/compare_sparse.log" 2>&1
echo "compare_sparse rc=$?"
grep -h "^RESULT\|SFI:" "$OUT"/compare_*.log | cut -c1-400 | tail -8
