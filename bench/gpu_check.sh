#!/usr/bin/env bash
# GPU check for train.py: the `paper` preset (SigLIP-so400m + Qwen2.5-1.5B shapes, random init, 144 image tokens,
# seq 4096, bf16, activation checkpointing) for a few dozen steps on the toy world packed at 4096, with and without
# the document mask, then with torch.compile. Prints tokens/s and MFU (median over the steps after warm-up).
#   bash bench/gpu_check.sh [STEPS]        # about 6-8 minutes on one H100/H200, most of it start-up and compilation
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-30}
PY=${PY:-python}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
$PY -c "import toyworld; print(toyworld.ensure())" > "$OUT/world"
WORLD=$(cat "$OUT/world")
$PY pack.py --input "$WORLD/pool" --output "$OUT/packed" --tokenizer "$WORLD/tokenizer.json" --seq-len 4096 \
    --image-tokens 144 > "$OUT/pack.log"
tail -1 "$OUT/pack.log"
run() {  # name, extra flags
    $PY train.py --preset paper --vision "" --llm "" --data "$OUT/packed" --tokenizer "$WORLD/tokenizer.json" \
        --out "$OUT/$1" --steps "$STEPS" --global-batch 16 --micro-batch 4 --workers 8 --log-every 10 "${@:2}" \
        > "$OUT/$1.log" 2>&1 || { tail -30 "$OUT/$1.log"; exit 1; }
    $PY - "$OUT/$1/metrics.jsonl" "$1" <<'PYEOF'
import json, statistics, sys
m = [json.loads(line) for line in open(sys.argv[1])][5:]  # skip warm-up and compilation
tok = statistics.median(r["tokens"] / r["time"] for r in m)
print(f"{sys.argv[2]:>14}: {tok:10,.0f} tok/s  MFU {statistics.median(r['mfu'] for r in m):6.1%}  "
      f"data-wait {statistics.median(r['data_wait'] for r in m):5.1%}  final loss {m[-1]['loss']:.3f}")
PYEOF
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run doc_mask
run no_doc_mask --no-doc-mask
run doc_mask_compile --compile
