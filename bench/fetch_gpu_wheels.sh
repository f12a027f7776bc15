#!/usr/bin/env bash
# Download, into .whl/ at the repository root, the Python wheels the GPU machine's image lacks
# (Python 3.12, torch 2.11, transformers, safetensors and huggingface-hub already there):
# diffusers and cache-dit, and importlib_metadata, which diffusers needs and the image does not have.
# bench/gpu_check.sh installs them to /tmp/site before anything else. Run once, on a machine with pip
# access to PyPI:
#
#   bash bench/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 cache-dit==1.5.3 importlib_metadata==10.2.0
ls -la .whl
