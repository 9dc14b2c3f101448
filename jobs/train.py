"""Entry point for `ray job submit ... -- python jobs/train.py --config CONFIG [key=value ...]` (as `cxr train`)."""

import sys

from cxr.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
