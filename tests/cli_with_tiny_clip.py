"""``anomalens`` command line with the test suite's tiny open_clip config registered (open_clip's extension point),
for tests that run the command in other processes (e.g. under torchrun)."""

import sys
from pathlib import Path

import open_clip

from anomalens.cli import main

if __name__ == "__main__":
    open_clip.add_model_config(Path(__file__).parent / "assets" / "anomalens-tiny-clip.json")
    sys.exit(main(sys.argv[1:]))
