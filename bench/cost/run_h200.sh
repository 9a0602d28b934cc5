#!/usr/bin/env bash
# The H200 half of the cost benchmark: Llama-3.2-1B and Llama-3-8B shapes with random
# weights, bf16, 256 sequences x 512 random tokens, all 7 linear kinds, r=16.
#   bash bench/cost/run_h200.sh 1b|8b      (run from the repository root; results go to $OUT)
# Fast methods (LoRA-GA included): the median of 3 timed runs after one warm-up. The slow inits (corda, eva)
# get one timed run each and EVA a 30 s cap (checked before every module), to fit the device time
# available. On the 8B shape CNTLoRA's statistics are capped at 16 GiB of GPU memory (2 passes
# over the data); each pass's layers are solved as soon as the pass ends, so nothing goes to the
# host (--offload would move the passes to host memory and solve them afterwards).
# CorDA (52 s on 1B with its one-sequence batches) and EVA are left out there for device time.
set -u
OUT=${OUT:-bench/results}
# the repository root on the path: `bench` is a top-level package, cntlora comes from src/ when not installed
export PYTHONPATH=.:src PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/cost-h200-machine.txt" 2>&1
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" >> "$OUT/cost-h200-machine.txt" 2>&1
COMMON="--device cuda --seqs 256 --seq-len 512 --batch-size 16 --r 16 --repeats 3 --slow-repeats 1 --eva-cap-seconds 30"
case "${1:-1b}" in
  1b) timeout ${T:-280} $PY -m bench.cost --model llama-1b $COMMON --ablate-svd \
        --profile "$OUT/cost-profile-llama-1b-h200.txt" --out "$OUT/cost-llama-1b-h200.json" 2>&1 \
        | grep -v -i "warn" | tee "$OUT/cost-h200-1b-log.txt" ;;
  8b) timeout ${T:-560} $PY -m bench.cost --model llama-8b $COMMON --max-stats-memory 16GiB \
        --methods floor cntlora-self default pissa_niter_4 olora lora_ga \
        --out "$OUT/cost-llama-8b-h200.json" 2>&1 | grep -v -i "warn" | tee "$OUT/cost-h200-8b-log.txt" ;;
esac
