"""``python -m benchmarks.kill9``: the command line (``cli.main``)."""

import sys

from .cli import main

sys.exit(main())
