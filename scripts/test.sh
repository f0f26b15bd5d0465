#!/usr/bin/env bash
# Set up with the test extras (and onnx, so the ONNX export tests run), then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev onnx
.venv/bin/ruff check src tests tools benchmarks
.venv/bin/ruff format --check src tests tools benchmarks
.venv/bin/python -m pytest "$@"
