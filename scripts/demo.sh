#!/usr/bin/env bash
# The main job, offline: the paper's whole pipeline with two real local experts (torouter demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/torouter demo --out "${OUT:-runs/demo}" "$@"
