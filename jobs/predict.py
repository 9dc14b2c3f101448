"""Entry point for `ray job submit ... -- python jobs/predict.py --model URI --images PATH --out FILE`."""

import sys

from cxr.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
