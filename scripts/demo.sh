#!/usr/bin/env bash
# The main job: CNTLoRA vs PEFT's default LoRA on all-MiniLM-L6-v2 + BBC News (a few minutes
# on 2 free CPU cores; CNTLoRA's statistics come from 128 of the 800 training articles).
# Writes runs/demo/{results.json,loss.png,adapter/}. Extra arguments go to `cntlora demo`
# (e.g. --steps 40 --out runs/quick, or --calibration-size all).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/cntlora demo "$@"
