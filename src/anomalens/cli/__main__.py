"""``python -m anomalens.cli``: the ``anomalens`` command."""

import sys

from anomalens.cli import main

sys.exit(main())
