"""Entry point for `ray job submit ... -- python jobs/retrain.py --config CONFIG [--prepare ROOT OUT] [--slot D]`."""

import sys

from cxr.cli import main

if __name__ == "__main__":
    sys.exit(main(["retrain", *sys.argv[1:]]))
