#!/usr/bin/env bash
# Second H200 call (the first one's 8B slot ran out after the floor): CNTLoRA on the 8B shape,
# one timed run, no warm-up, statistics capped at 16 GiB on the GPU and offloaded to the host.
set -u
OUT=${OUT:-bench/results}
export PYTHONPATH=src PYTHONUNBUFFERED=1
timeout ${T8B:-110} ${PYTHON:-python3} -m cntlora.bench.cost --model llama-8b --device cuda --seqs 256 --seq-len 512 \
  --batch-size 16 --r 16 --repeats 1 --warmup 0 --methods cntlora-cross --max-stats-memory 16GiB --offload \
  --randomized-svd-above 256 --out "$OUT/cost-llama-8b-h200-cntlora.json" 2>&1 | grep -v -i "warn" | tee "$OUT/cost-h200-8b-log.txt"
