"""Entry point for `ray job submit ... -- python jobs/explain.py --model URI --data ROOT --out DIR`."""

import sys

from cxr.cli import main

if __name__ == "__main__":
    sys.exit(main(["explain", *sys.argv[1:]]))
