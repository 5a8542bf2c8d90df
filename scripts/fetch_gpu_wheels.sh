#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.sh installs (scripts/gpu-wheels.txt, about 26 MB) into
# scripts/wheels/ for a machine with Python 3.12 on x86-64 and no network. Run it where pip can
# reach PyPI; the wheels are not committed (binaries in git history): carry scripts/wheels with
# the working tree (the device tool's `carry`, or copy it).
#   scripts/fetch_gpu_wheels.sh [PYTHON_VERSION]   (default 3.12)
set -euo pipefail
cd "$(dirname "$0")"
version="${1:-3.12}"
python3 -m pip download --no-deps --only-binary=:all: --python-version "$version" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d wheels -r gpu-wheels.txt
ls -l wheels
