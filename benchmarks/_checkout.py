"""Make the benchmarks measure this checkout's code, not the copy installed in the venv.

Why: ``.venv/bin/python benchmarks/X.py`` puts ``benchmarks/`` first on the import path, so
``ptychodus_torch_plugin`` came from site-packages: the non-editable install that
``scripts/ensure_env.sh`` refreshes only when the tests or the demo run. After an edit a
benchmark then reported the old code's numbers under the new commit. Imported first by every
benchmark (the engine is pure Python; its dependencies still come from the venv).
"""

from __future__ import annotations

import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]

if (CHECKOUT / "ptychodus_torch_plugin").is_dir() and str(CHECKOUT) not in sys.path[:1]:
    sys.path.insert(0, str(CHECKOUT))
