#!/usr/bin/env bash
# The main job, offline: make a small routing dataset, train an MLP router, evaluate it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/quickstart}
mkdir -p "$OUT"
.venv/bin/torouter synth --out "$OUT/data.jsonl" --n 400 --test-fraction 0.25
.venv/bin/torouter train "$OUT/data.jsonl" --method mlp --out "$OUT/router"
.venv/bin/torouter eval "$OUT/router" "$OUT/data.test.jsonl" --json "$OUT/report.json" --plot "$OUT/cost_quality.png"
