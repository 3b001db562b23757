#!/usr/bin/env bash
# One GPU call: sfi vs a dense backend on real sglang, correctness then a first speed sample.
# usage: bash benchmarks/gpu_check.sh OUTDIR [STEPS]   (STEPS: comma list of compare,speed)
# Needs sglang 0.5.17 and sfi-sglang installed (see README, offline install).
set -u
OUT=${1:?outdir}; STEPS=${2:-compare,speed}
mkdir -p "$OUT"; export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
HERE=$(cd "$(dirname "$0")/.." && pwd)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"

if [[ ,$STEPS, == *,compare,* ]]; then
  python -m sfi_sglang.dummy_model /tmp/sfi-small --preset small --random-weights > /dev/null 2>&1
  # budget >= context: sfi must give flashinfer's tokens
  SFI_CONFIG='{"topk": 32768, "max_fast_steps": 8, "min_refresh_gap": 4, "log_interval": 20}' \
    timeout 300 python "$HERE/tests/engine_compare.py" /tmp/sfi-small flashinfer --load-format auto \
    --prompts 4 --prompt-len 1500 --new-tokens 48 --log-level info > "$OUT/compare_full.log" 2>&1
  echo "compare_full rc=$?"
  # default budget on a 6K prompt: agreement is informational (random weights)
  SFI_CONFIG='{"topk": 1024, "log_interval": 20}' \
    timeout 300 python "$HERE/tests/engine_compare.py" /tmp/sfi-small flashinfer --load-format auto \
    --prompts 4 --prompt-len 6000 --new-tokens 64 --log-level info > "$OUT/compare_sparse.log" 2>&1
  echo "compare_sparse rc=$?"
  grep -h "^RESULT\|SFI:" "$OUT"/compare_*.log | cut -c1-400 | tail -8
fi

if [[ ,$STEPS, == *,speed,* ]]; then
  python -m sfi_sglang.dummy_model /tmp/q4b --preset qwen3-4b > /dev/null
  run() {  # name backend graph bs ctx
    timeout 280 python -m sfi_sglang.bench_one_batch --model-path /tmp/q4b --load-format dummy \
      --attention-backend "$2" --cuda-graph-backend-decode "$3" --cuda-graph-backend-prefill disabled \
      --cuda-graph-max-bs-decode 16 --mem-fraction-static 0.6 --batch-size "$4" --input-len "$5" \
      --output-len 64 --run-name "$1" --result-filename "$OUT/speed.jsonl" > /tmp/speed_run.log 2>&1
    rc=$?; { echo "=== $1 bs=$4 ctx=$5 rc=$rc"; grep -a "SFI\|Error\|error\|Decode\|decode" /tmp/speed_run.log | tail -20; } >> "$OUT/speed.log"
    echo "speed $1 bs=$4 ctx=$5 rc=$rc"
  }
  for shape in "8 32768" "1 8192"; do
    set -- $shape
    SFI_CONFIG='{"max_fast_steps": 32, "log_interval": 50}' run sfi sfi disabled "$1" "$2"
    run flashinfer_graph flashinfer full "$1" "$2"
    run flashinfer_eager flashinfer disabled "$1" "$2"
  done
  python - "$OUT/speed.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r.get("run_name"), r.get("batch_size"), r.get("input_len"), "decode ms", round(1000 * r.get("median_decode_latency", 0), 2))
PY
fi
