"""Entry point for `ray job submit -- python jobs/prepare.py DATA_ROOT OUT_URI [options]` (same as `cxr prepare`)."""

import sys

from cxr.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
