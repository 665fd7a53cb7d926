"""``python -m anomalens``: the ``anomalens`` command line."""

import sys

from anomalens.cli import main

sys.exit(main())
