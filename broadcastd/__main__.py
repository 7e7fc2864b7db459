"""``python -m broadcastd``: the same as the ``broadcastd`` command."""

import sys

from broadcastd.cli import main

sys.exit(main())
