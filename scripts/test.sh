#!/usr/bin/env bash
# Set up with the test extras (onnx and tensorboard too, so their tests run), then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev onnx tensorboard
.venv/bin/ruff check src tests tools benchmarks
.venv/bin/ruff format --check src tests tools benchmarks
.venv/bin/python -m pytest "$@"
