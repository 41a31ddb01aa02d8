#!/usr/bin/env bash
# The README's main job: simulate, train briefly on the CPU, reconstruct, write the image.
# Usage: bash scripts/demo.sh [OUTPUT_DIR]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/ensure_env.sh"
VENV=${PTT_VENV:-$ROOT/.venv}
cd "$ROOT"
exec "$VENV/bin/python" "$ROOT/scripts/demo.py" "${1:-demo_output}"
