"""Initial weights come only from a file the user names (local path or any fsspec URL); nothing is downloaded.

Either a whole-model weight file written by these models (e.g. a checkpoint's `model.weights.h5`), or a
backbone-only file such as keras.applications' `*_notop.h5`, which is loaded into the backbone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import tempfile
import urllib.parse
import warnings
from collections.abc import Iterator

import keras

from cxr import storage
from cxr.models.zoo import BACKBONE
from cxr.redact import redact

log = logging.getLogger(__name__)


def load_initial_weights(model: keras.Model, url: str) -> None:
    """Load a whole-model or backbone-only weight file from a local path or fsspec URL.

    Raises FileNotFoundError if there is no such file, ValueError if it fits neither the model nor
    its backbone.
    """
    if not storage.exists(url):
        raise FileNotFoundError(f"initial weights {redact(url)!r}: no such file")
    with _local_copy(url) as path:
        errors = [_try_load(model, path)]
        if errors[0] is None:
            log.info("loaded model weights from %s", redact(url))
            return
        if _has_backbone(model):
            errors.append(_try_load(model.get_layer(BACKBONE), path))
            if errors[1] is None:
                log.info("loaded backbone weights from %s", redact(url))
                return
    details = "; ".join(f"{what}: {err}" for what, err in zip(("model", "backbone"), errors, strict=False))
    raise ValueError(f"initial weights {redact(url)!r} do not match model {model.name!r} ({details})")


def _has_backbone(model: keras.Model) -> bool:
    return any(layer.name == BACKBONE for layer in model.layers)


def _try_load(target: keras.Model, path: str) -> str | None:
    """None if the file loaded into `target`, else the reason it did not.

    A failed attempt floods Keras warnings (one per unmatched layer), which say nothing the error
    does not; warnings from a load that succeeded are passed on, since they may mean a partial load.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            target.load_weights(path)
        except Exception as exc:  # noqa: BLE001 - Keras raises several types for a mismatched file
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    for w in caught:
        log.warning("loading %s into %s: %s", path, target.name, w.message)
    return None


@contextlib.contextmanager
def _local_copy(url: str) -> Iterator[str]:
    """A local path for `url`: the file itself, or an object-store file downloaded to a temp dir."""
    if storage.is_local(url):
        yield storage.filesystem(url)[1]
        return
    with tempfile.TemporaryDirectory(prefix="cxr-weights-") as tmp:
        # Keras picks the loader from the suffix (.weights.h5, legacy .h5), so keep the name (not a presigned
        # URL's query string).
        path = os.path.join(tmp, posixpath.basename(urllib.parse.urlsplit(url).path.rstrip("/")))
        storage.download(url, path)
        yield path
