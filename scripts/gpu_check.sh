#!/usr/bin/env bash
# The prepared GPU check, one command on a bare CUDA machine with torch but no network:
#   bash scripts/gpu_check.sh            (results in $OUT/gpu_check.json, or runs/gpu_check/ without $OUT)
# Packages that machine lacks are installed from the wheels scripts/gpu_wheels.sh put in .whl/ (carried along).
# Extra arguments go to scripts/gpu_check.py (e.g. --device cpu --tiny for a dry run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import ultralytics" 2>/dev/null; then
  [ -d .whl ] || { echo "gpu_check: ultralytics is not installed and no .whl/ was carried (run scripts/gpu_wheels.sh)"; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps .whl/*.whl
fi
OUT_DIR=${OUT:-runs/gpu_check}
exec timeout 470 "$PY" scripts/gpu_check.py --out "$OUT_DIR/gpu_check.json" --work "$(mktemp -d)" "$@"
