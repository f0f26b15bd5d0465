#!/usr/bin/env bash
# Create .venv (once) with PyTorch and gmlp-vision installed; arguments name extras to add (e.g. dev).
# PyTorch: an existing install in .venv is kept. Otherwise $TORCH_SPEC is installed first (default torch==2.13.0, the
# CPU build these machines hold locally); on a CUDA machine install the torch build you want into .venv beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
extras=$(IFS=,; echo "$*")
"${pip[@]}" -e ".${extras:+[$extras]}"
