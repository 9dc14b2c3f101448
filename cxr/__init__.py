"""cxr: distributed training of multi-label chest X-ray classifiers."""

__version__ = "0.1.0"
