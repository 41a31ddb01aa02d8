#!/usr/bin/env bash
# Run the test suite (and the linter) against the installed, non-editable package.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/ensure_env.sh"
source "$ROOT/scripts/venv_path.sh"
cd "$ROOT"
"$VENV/bin/ruff" check ptychodus_torch_plugin tests benchmarks
export QT_QPA_PLATFORM=${QT_QPA_PLATFORM:-offscreen}
exec "$VENV/bin/pytest" "$@"
