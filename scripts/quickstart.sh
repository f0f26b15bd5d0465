#!/usr/bin/env bash
# Set up, then train on the embedded 8x8 digits (offline) and evaluate the result on its test split.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
rm -rf runs/quickstart
.venv/bin/gmlp train --dataset digits --out runs/quickstart
.venv/bin/gmlp evaluate runs/quickstart
