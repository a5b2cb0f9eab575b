"""``python -m benchmarks.kill9``: the command line (``command.main``)."""

import sys

from .command import main

sys.exit(main())
