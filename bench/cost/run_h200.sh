#!/usr/bin/env bash
# The H200 half of the cost benchmark (issue 4): Llama-3.2-1B and Llama-3-8B shapes with random
# weights, bf16, 256 sequences x 512 random tokens, all 7 linear kinds, r=16.
# Run from the repository root; results go to $OUT (default bench/results).
# The slow inits get one timed run each (--slow-repeats 1) and EVA a 30 s cap, to fit the
# session's device-time budget; everything else is the median of 3 after one warm-up.
set -u
OUT=${OUT:-bench/results}
export PYTHONPATH=src PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/cost-h200-machine.txt" 2>&1
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" >> "$OUT/cost-h200-machine.txt" 2>&1
COMMON="--device cuda --seqs 256 --seq-len 512 --batch-size 16 --r 16 --repeats 3 --slow-repeats 1 --eva-cap-seconds 30 --randomized-svd-above 256"
timeout ${T1B:-230} $PY -m cntlora.bench.cost --model llama-1b $COMMON --ablate-svd \
  --profile "$OUT/cost-profile-llama-1b-h200.txt" --out "$OUT/cost-llama-1b-h200.json" 2>&1 \
  | grep -v -i "warn" | tee "$OUT/cost-h200-log.txt"
timeout ${T8B:-320} $PY -m cntlora.bench.cost --model llama-8b $COMMON --max-stats-memory 16GiB --offload \
  --methods floor cntlora-cross default pissa_niter_4 olora lora_ga eva \
  --out "$OUT/cost-llama-8b-h200.json" 2>&1 | grep -v -i "warn" | tee -a "$OUT/cost-h200-log.txt"
