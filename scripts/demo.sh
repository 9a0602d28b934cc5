#!/usr/bin/env bash
# The main job: CNTLoRA vs PEFT's default LoRA on all-MiniLM-L6-v2 + BBC News (about 5 minutes
# on 2 CPU cores). Writes runs/demo/{results.json,loss.png,adapter/}. Extra arguments go to
# `cntlora demo` (e.g. --steps 40 --out runs/quick).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/cntlora demo "$@"
