"""``ptychodus-torch launch [ptychodus arguments]``: Ptychodus with this plugin registered.

The wheel's ``ptychodus/plugins`` module registers the plugin whenever ``ptychodus`` starts;
that folder is not seen when Ptychodus itself is an editable install. This launcher installs
the same bootstrap first and then runs Ptychodus's own ``main`` with the given arguments
(GUI, or ``-b reconstruct|train -i IN -o OUT``), so it works for every install.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Bootstrap the plugin, then run ``ptychodus`` with ``argv``; returns its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    from .registration import bootstrap

    bootstrap()
    from ptychodus.__main__ import main as ptychodus_main

    saved = sys.argv
    sys.argv = ["ptychodus", *args]  # Ptychodus parses sys.argv itself
    try:
        code = ptychodus_main()
    finally:
        sys.argv = saved
    return int(code or 0)
