#!/usr/bin/env bash
# Create or refresh the project's virtual environment, idempotently.
#  - dependencies (torch first, then everything pinned by constraints.txt) are installed only
#    when pyproject.toml or constraints.txt changed since the last run;
#  - the package itself is reinstalled (non-editable, as users get it) only when its sources
#    changed.
# A second run with nothing changed takes about a second.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/venv_path.sh"
PYTHON_GIVEN=${PYTHON:-}
PYTHON=${PYTHON:-python3}
# sha256sum is GNU coreutils; macOS has shasum
SHA256="sha256sum"
command -v sha256sum > /dev/null || SHA256="shasum -a 256"

quiet_pip() {
  # This workplace's pip.conf names optional local indexes that may not exist; drop that noise.
  "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 \
    | { grep -v -e "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

tree_hash() {
  (cd "$ROOT" && find "$@" -type f -not -path '*/__pycache__/*' -not -name '*.pyc' -print0 \
    | sort -z | xargs -0 $SHA256 | $SHA256 | cut -d' ' -f1)
}

python_version() {
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'
}

# A usable environment has a Python whose pip works: a venv made without ensurepip (Debian's
# python3-venv missing) or cut short by Ctrl-C has bin/python and nothing else, and was
# trusted forever. PYTHON=... given for an environment of another Python version rebuilds it.
have=""
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version > /dev/null 2>&1; then
  have=$(python_version "$VENV/bin/python")
fi
rebuild=""
if [ -z "$have" ]; then
  rebuild="created"
  if [ -e "$VENV" ]; then
    rebuild="rebuilt: it is incomplete (no working pip)"
  fi
elif [ -n "$PYTHON_GIVEN" ]; then
  wanted=$(python_version "$PYTHON") || { echo "[env] error: PYTHON=$PYTHON cannot be run" >&2; exit 1; }
  if [ "$wanted" != "$have" ]; then
    rebuild="rebuilt: it has Python $have, PYTHON=$PYTHON is $wanted"
  fi
fi
if [ -n "$rebuild" ]; then
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2> /dev/null; then
    echo "[env] error: Python >= 3.11 is needed, and $PYTHON is" \
      "$("$PYTHON" --version 2>&1 | head -n 1 || echo 'not found'): set PYTHON=python3.11" \
      "(or newer)" >&2
    exit 1
  fi
  echo "[env] virtual environment $VENV $rebuild"
  "$PYTHON" -m venv --clear "$VENV"
  if ! "$VENV/bin/python" -m pip --version > /dev/null 2>&1; then
    echo "[env] error: the new environment has no pip (on Debian/Ubuntu: apt install" \
      "python3-venv, or python3.X-venv for your version), then run this again" >&2
    exit 1
  fi
fi

deps_hash=$(tree_hash pyproject.toml constraints.txt)
if [ "$(cat "$VENV/.deps-stamp" 2>/dev/null || true)" != "$deps_hash" ]; then
  echo "[env] installing pinned dependencies (first run: about 2 minutes)"
  # torch first and pinned. On Linux x86-64 PyPI's torch is the CUDA build (several GB with
  # its nvidia packages); PTT_TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the
  # CPU build from PyTorch's index instead (this workplace's pip already finds a local one).
  torch_index=()
  if [ -n "${PTT_TORCH_INDEX:-}" ]; then
    torch_index=(--extra-index-url "$PTT_TORCH_INDEX")
  fi
  quiet_pip install -q ${torch_index[@]+"${torch_index[@]}"} -c "$ROOT/constraints.txt" "setuptools>=77" wheel torch
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
