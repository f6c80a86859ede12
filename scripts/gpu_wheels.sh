#!/usr/bin/env bash
# Run here (where pip reaches PyPI): the pure-Python wheels the GPU check needs that the lent CUDA machine lacks
# (it has its own torch, numpy, opencv, onnx, onnxruntime, scipy, matplotlib, ... and reaches no registry), into .whl/,
# which the device tool carries: run(command="bash scripts/gpu_check.sh", carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# ultralytics and what it imports beyond that machine's image; versions as in requirements.txt
# polars (50 MB with its runtime) is left out: the device tool carries 64 MiB in all, and only Ultralytics' CSV
# helpers import it (lazily), which the check does not call
for spec in ultralytics==8.4.190 ultralytics-thop onnxsim==0.8.1; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$spec" || echo "gpu_wheels: no wheel for $spec (the check runs without it if possible)"
done
du -sh .whl && ls .whl
