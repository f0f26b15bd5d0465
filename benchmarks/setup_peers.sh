#!/usr/bin/env bash
# Install the peer implementations the benchmark compares against into the project venv (.venv), never via extras.
# Everything goes in with --no-deps: timm's declared torchvision would pull a CUDA torch that does not load beside the
# CPU one, so `bench.py` puts a tiny stand-in (`benchmarks/_stubs/torchvision`) on sys.path instead. The hub client
# is left out on purpose: `import timm` treats huggingface_hub as optional, and the benchmark downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps)
"${pip[@]}" "timm==1.0.*" "pyyaml>=6" "g-mlp-pytorch==0.1.5" "einops>=0.8"
.venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks/_stubs'); import timm, g_mlp_pytorch, einops; \
print(f'timm {timm.__version__}, g-mlp-pytorch, einops {einops.__version__}: ok')"
