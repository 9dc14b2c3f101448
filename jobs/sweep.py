"""Entry point for `ray job submit ... -- python jobs/sweep.py --config CONFIG --space SPACE.yaml` (as `cxr sweep`)."""

import sys

from cxr.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
