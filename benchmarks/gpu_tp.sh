#!/usr/bin/env bash
# Tensor parallel on a machine with >= 2 GPUs: (1) each backend at tp 1 vs tp 2 on a random-weight
# model (sfi's greedy tokens must stay as close to its tp-1 tokens as the dense backend's do), then
# (2) decode throughput at tp 2, sfi vs FlashInfer (bench_decode.py). usage: bash benchmarks/gpu_tp.sh OUTDIR [SHAPES]
# Needs sglang 0.5.17 and sfi-sglang installed (see README, offline install).
set -u
OUT=${1:?outdir}; SHAPES=${2:-4x131072,8x131072}
mkdir -p "$OUT"; export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
HERE=$(cd "$(dirname "$0")/.." && pwd)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"

python -m sfi_sglang.dummy_model /tmp/sfi-small --preset small --random-weights > /dev/null 2>&1
SFI_CONFIG='{"topk": 1024, "log_interval": 20}' timeout 420 python "$HERE/tests/serving/engine_compare.py" /tmp/sfi-small \
  flashinfer --load-format auto --prompts 4 --prompt-len 6000 --new-tokens 64 --across-tp 2 > "$OUT/across_tp.log" 2>&1
echo "across_tp rc=$?"; grep -h "^RESULT" "$OUT/across_tp.log" | tail -1 | cut -c8- > "$OUT/across_tp.json"; cat "$OUT/across_tp.json"

# per process: ~150 s at 8 x 128K on 2x H200 once FlashInfer's kernels are compiled (the first run compiles them)
python "$HERE/benchmarks/bench_decode.py" --tp 2 --shapes "$SHAPES" --dense flashinfer --refresh 32,16 \
  --timeout 420 --out "$OUT/decode_throughput_tp2.json" > "$OUT/decode_tp2.log" 2>&1
echo "decode tp2 rc=$?"; tail -8 "$OUT/decode_tp2.log"
