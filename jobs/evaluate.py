"""Entry point for `ray job submit ... -- python jobs/evaluate.py --model URI [--data URI] --out DIR`."""

import sys

from cxr.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
