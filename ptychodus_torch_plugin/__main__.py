"""``python -m ptychodus_torch_plugin``: the same command line as ``ptychodus-torch``."""

import sys

from .cli import main

sys.exit(main())
