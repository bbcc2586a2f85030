#!/usr/bin/env bash
# The linter (ruff: pyflakes and bugbear rules) over the whole tree and the type checker (mypy) on the core.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/mypy
