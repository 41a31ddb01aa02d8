#!/usr/bin/env bash
# Create or refresh the project's virtual environment, idempotently.
#  - dependencies (torch first, then everything pinned by constraints.txt) are installed only
#    when pyproject.toml or constraints.txt changed since the last run;
#  - the package itself is reinstalled (non-editable, as users get it) only when its sources
#    changed.
# A second run with nothing changed takes about a second.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${PTT_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}

quiet_pip() {
  # This workplace's pip.conf names optional local indexes that may not exist; drop that noise.
  "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 \
    | { grep -v -e "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

tree_hash() {
  (cd "$ROOT" && find "$@" -type f -not -path '*/__pycache__/*' -not -name '*.pyc' -print0 \
    | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi

deps_hash=$(tree_hash pyproject.toml constraints.txt)
if [ "$(cat "$VENV/.deps-stamp" 2>/dev/null || true)" != "$deps_hash" ]; then
  echo "[env] installing pinned dependencies (first run: about 2 minutes)"
  # torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
  quiet_pip install -q -c "$ROOT/constraints.txt" "setuptools>=69" wheel torch
  quiet_pip install -q -c "$ROOT/constraints.txt" "$ROOT[test]"
  echo "$deps_hash" > "$VENV/.deps-stamp"
  rm -f "$VENV/.pkg-stamp"
fi

# resources/settings: the ready-made .ini files are installed as package data
pkg_hash=$(tree_hash ptychodus_torch_plugin resources/settings entry_points.txt pyproject.toml README.md)
if [ "$(cat "$VENV/.pkg-stamp" 2>/dev/null || true)" != "$pkg_hash" ]; then
  echo "[env] installing ptychodus-torch-plugin (non-editable)"
  rm -rf "$ROOT/build"
  quiet_pip install -q --no-deps --no-build-isolation --force-reinstall "$ROOT"
  rm -rf "$ROOT/build" "$ROOT"/*.egg-info
  echo "$pkg_hash" > "$VENV/.pkg-stamp"
fi
