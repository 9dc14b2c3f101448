"""Initial weights come only from what the user names (local path, fsspec URL, MLflow URI); nothing is downloaded.

Either a whole-model weight file written by these models (e.g. a checkpoint's `model.weights.h5`), a
backbone-only file such as keras.applications' `*_notop.h5`, which is loaded into the backbone, or a trained
model to fine-tune (`models:/NAME@champion`, `runs:/…`, a checkpoint folder): every layer but the head is
taken over, and the head's column of each finding the two label sets share (`cxr/labelmap.yaml`), so a
hospital starting from the NIH champion keeps what the NIH model learned of Effusion (its "Pleural Effusion")
and gets a new output for a finding NIH lacks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import tempfile
import urllib.parse
import warnings
from collections.abc import Iterator, Sequence

import keras

from cxr import storage
from cxr.models.zoo import BACKBONE, HEAD
from cxr.redact import redact

log = logging.getLogger(__name__)


def load_initial_weights(model: keras.Model, url: str, findings: Sequence[str] = (),
                         tracking_uri: str | None = None) -> None:
    """Load a whole-model or backbone-only weight file, or a trained model's weights (module docstring).

    Raises FileNotFoundError if there is no such file, ValueError if it fits neither the model nor
    its backbone.
    """
    if url.startswith(("models:/", "runs:/")) or _is_checkpoint(url):
        from cxr.models.loading import load  # a model URI: loaded as `cxr evaluate` loads one

        source = load(url, tracking_uri)
        fine_tune(source.model, source.findings, model, tuple(findings) or source.findings, redact(url))
        return
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


def _is_checkpoint(url: str) -> bool:
    """A folder holding a checkpoint's config; a weight file (by its path's suffix, a presigned URL's query
    aside) or an http(s) URL (no folders there) never is."""
    from cxr.training.checkpoints import CONFIG_FILE

    parts = urllib.parse.urlsplit(url)
    if parts.path.endswith((".h5", ".keras")) or parts.scheme in ("http", "https"):
        return False
    return storage.exists(storage.join(url, CONFIG_FILE))


def fine_tune(source: keras.Model, source_findings: Sequence[str], target: keras.Model,
              target_findings: Sequence[str], where: str) -> None:
    """Copy `source` into `target`: every layer but the head whole, the head per shared finding (`cxr.labelmap`).

    The architectures must match below the head (the same model.name and image size); a head over the same
    findings in the same order is copied whole, so the whole model continues.
    """
    mismatched = []
    for layer in target.layers:
        if layer.name == HEAD or not layer.weights:
            continue
        try:
            src = source.get_layer(layer.name)
            layer.set_weights(src.get_weights())
        except ValueError as exc:
            mismatched.append(f"{layer.name}: {str(exc).splitlines()[0]}")
    if mismatched:
        raise ValueError(f"initial model {where} ({source.name}, {source.input_shape[1]} px) does not fit "
                         f"{target.name} at {target.input_shape[1]} px: {'; '.join(mismatched[:3])}")
    from cxr import labelmap

    kernel, bias = source.get_layer(HEAD).get_weights()
    new_kernel, new_bias = target.get_layer(HEAD).get_weights()
    index = {name: i for i, name in enumerate(source_findings)}
    position = {name: j for j, name in enumerate(target_findings)}
    pairs = labelmap.shared(list(target_findings), list(source_findings))  # NIH Effusion → Pleural Effusion too
    for name, source_name in pairs:
        j, i = position[name], index[source_name]
        new_kernel[:, j], new_bias[j] = kernel[:, i], bias[i]
    target.get_layer(HEAD).set_weights([new_kernel, new_bias])
    if list(source_findings) == list(target_findings):
        log.info("fine-tuning %s: the same %d findings, the whole model continues", where, len(target_findings))
        return
    carried = {name for name, _ in pairs}
    new = [name for name in target_findings if name not in carried]
    log.info("fine-tuning %s: the label sets differ (%d findings -> %d); kept every layer below the head and "
             "the head's %d shared finding(s); new outputs for %s", where, len(source_findings),
             len(target_findings), len(pairs), ", ".join(new) if new else "none")


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
