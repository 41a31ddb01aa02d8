"""``ptychodus-torch``: one console script, two audiences.

``ptychodus-torch launch [ptychodus arguments]`` starts Ptychodus (GUI, or ``-b`` batch mode)
with this plugin registered, for installs where the ``ptychodus/plugins`` autoload module is
not picked up (an editable Ptychodus). Every other subcommand (simulate, train, infer, inspect)
is the engine's command line, which never imports Ptychodus or Qt.
"""

from __future__ import annotations

import sys

LAUNCH = "launch"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == LAUNCH:
        from .host.launcher import main as launch

        return launch(args[1:])
    from .engine.cli import main as engine_main

    return engine_main(args)


if __name__ == "__main__":
    sys.exit(main())
