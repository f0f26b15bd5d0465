#!/usr/bin/env bash
# Set up with the test extras (onnx, tensorboard and hub too, so their tests run), then lint, check the wheel's metadata and
# contents, and run the whole test suite, a worker per core.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev onnx tensorboard hub parquet mlflow wandb serve triton
# timm, the peer the timm-layout export is checked against (tests/test_timm_export.py): a test-time tool, never a
# dependency of the package; without its dependencies (its torchvision import is served by benchmarks/_stubs).
.venv/bin/python -m pip show --quiet timm >/dev/null 2>&1 ||
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "timm>=1.0,<2"
# Chromium from the distribution, for the demo page's browser test (tests/test_serve_page.py skips, saying so, where
# it cannot be installed): as root with apt only; Playwright drives it (the dev extra).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -qq chromium || { apt-get update -qq && apt-get install -y -qq chromium; }; } >/dev/null 2>&1 ||
        echo "test.sh: Chromium could not be installed; the browser test will skip" >&2
fi
.venv/bin/ruff check src tests tools benchmarks
.venv/bin/ruff format --check src tests tools benchmarks
# The wheel, built with .venv's setuptools (the dev extra pins >= 77, the first to accept license = "MIT"), its build/
# in a temp dir (DIST_EXTRA_CONFIG) so that no stale file of an earlier build in the tree can land in it.
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
printf '[build]\nbuild_base = %s/build\n' "$wheels" >"$wheels/setup.cfg"
DIST_EXTRA_CONFIG="$wheels/setup.cfg" .venv/bin/python -m pip wheel --quiet --no-deps --no-build-isolation \
    --check-build-dependencies -w "$wheels" .
.venv/bin/python - "$wheels"/gmlp_vision-*.whl <<'PY'
import sys
import zipfile
from email.parser import HeaderParser

wheel = zipfile.ZipFile(sys.argv[1])
names = set(wheel.namelist())
meta = HeaderParser().parsestr(wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
fields = {"Name": "gmlp-vision", "Version": "0.3.0", "License-Expression": "MIT", "Requires-Python": ">=3.10",
          "Description-Content-Type": "text/markdown"}
classifiers = set(meta.get_all("Classifier") or ())
wanted = ["Intended Audience :: Developers", "Intended Audience :: Science/Research",
          "Operating System :: OS Independent", "Programming Language :: Python :: 3 :: Only",
          *(f"Programming Language :: Python :: 3.{minor}" for minor in range(10, 14)),
          "Topic :: Scientific/Engineering :: Artificial Intelligence",
          "Topic :: Scientific/Engineering :: Image Recognition", "Typing :: Typed"]
files = ["py.typed", "fused.c", "serve_page.html", "data/digits.py", "data/digits.csv.gz", "data/digits-LICENSE.txt"]
checks = {
    **{f"{key}: {value}": meta[key] == value for key, value in fields.items()},
    **{f"classifier {c}": c in classifiers for c in wanted},
    "no licence classifier (License-Expression says it)": not any(c.startswith("License ::") for c in classifiers),
    "scikit-learn not in Requires-Dist": not any("scikit-learn" in r for r in meta.get_all("Requires-Dist") or ()),
    "the serve, mlflow and wandb packages only in their extras": all(
        "extra ==" in r for r in meta.get_all("Requires-Dist") or () if r.startswith(("fastapi", "uvicorn", "mlflow", "wandb"))
    ),
    **{f"gmlp_vision/{f} in the wheel": f"gmlp_vision/{f}" in names for f in files},
}
if failed := [check for check, ok in checks.items() if not ok]:
    sys.exit(f"{sys.argv[1]} fails: " + "; ".join(failed))
print(f"wheel ok: {len(checks)} checks, {len(names)} files, {sum(i.file_size for i in wheel.infolist()):,} bytes")
PY
# One pytest worker per core (pytest-xdist): on 2 cores the suite takes ~3.7 minutes instead of ~5.9.
.venv/bin/python -m pytest -n auto "$@"
