"""cxr: distributed training of multi-label chest X-ray classifiers."""

from cxr import quiet as _quiet

__version__ = "0.1.0"

_quiet.install()  # before anything imports TensorFlow, here and in every Ray worker that loads cxr code
