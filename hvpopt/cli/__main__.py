"""``python -m hvpopt.cli``: the ``hvpopt`` command."""

import sys

from hvpopt.cli import main

sys.exit(main())
