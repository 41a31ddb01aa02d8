# Sourced by the scripts: VENV, the virtual environment's absolute path (PTT_VENV, else
# ROOT/.venv). Absolute because demo.sh and test.sh change directory before they use it, so a
# relative PTT_VENV=venv-cpu named another folder (or none) by then.
VENV=${PTT_VENV:-$ROOT/.venv}
case "$VENV" in
  /*) ;;
  *) VENV="$PWD/$VENV" ;;
esac
