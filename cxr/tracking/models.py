"""Models in MLflow: the best epoch's model logged with two faces, and any model URI loaded back.

A logged model carries the Keras flavour (`data/model.keras`, stock layers only, so `mlflow.keras.load_model`
works without cxr) and a python_function flavour whose loader is `cxr.tracking.pyfunc`, shipped inside the
model, so `mlflow.pyfunc.load_model` works in any interpreter and returns a table named by the model's own
findings (`data/findings.json`; a model from before label sets has none and is NIH's 14). The signature names
those outputs; it declares no input dtype, because uint8 (0-255) and float (0-1) images
are both accepted and checked by the loader itself. The input example is a uint8 batch.

`load` takes what users have: a checkpoint folder, `runs:/…`, `models:/NAME/VERSION`, `models:/NAME@ALIAS` or
`models:/m-…`, and returns the Keras model with where it came from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import types
from dataclasses import dataclass, field
from typing import Any

from cxr.labels import FINDINGS
from cxr.redact import redact

log = logging.getLogger(__name__)
LOADER = "cxr_pyfunc"  # the module name of cxr/tracking/pyfunc.py inside a logged model's code/


def _save(path: str, mlflow_model: Any, keras_model: Any, input_example: Any = None,
          findings: tuple[str, ...] = FINDINGS, **_: Any) -> None:
    """The flavour `Model.log` calls: mlflow.keras's saving, then our pyfunc loader and output signature."""
    import keras
    import mlflow
    import tensorflow as tf
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from cxr.tracking import pyfunc

    os.makedirs(path, exist_ok=True)  # mlflow.keras writes the input example into it before creating it
    keras_log = logging.getLogger("mlflow.keras.save")  # it warns of the signature we set right after
    level, keras_log.level = keras_log.level, logging.ERROR
    try:
        mlflow.keras.save_model(keras_model, path, mlflow_model=mlflow_model, input_example=input_example,
                                pip_requirements=[f"keras=={keras.__version__}", f"tensorflow=={tf.__version__}",
                                                  "numpy", "pandas"])
    finally:
        keras_log.level = level
    with open(os.path.join(path, "data", pyfunc.FINDINGS_FILE), "w") as fh:
        json.dump(list(findings), fh)
    os.makedirs(os.path.join(path, "code"), exist_ok=True)
    shutil.copyfile(pyfunc.__file__, os.path.join(path, "code", f"{LOADER}.py"))
    conf = mlflow_model.flavors["python_function"]
    conf.update(loader_module=LOADER, code="code", data="data")
    mlflow_model.signature = ModelSignature(outputs=Schema([ColSpec("double", name) for name in findings]))
    mlflow_model.save(os.path.join(path, "MLmodel"))


def log_model(model: Any, name: str, step: int, registered_model: str | None = None,
              tags: dict[str, str] | None = None, findings: tuple[str, ...] = FINDINGS) -> Any:
    """Log `model` into the active run at `step` (the LoggedModel links that step's metrics); register it
    under `registered_model` if given. Returns MLflow's ModelInfo."""
    import numpy as np
    from mlflow.models import Model

    size = int(model.input_shape[1])
    if len(findings) != int(model.output_shape[-1]):
        raise ValueError(f"{len(findings)} finding names for a model with {model.output_shape[-1]} outputs")
    example = np.zeros((1, size, size, 1), np.uint8)
    return Model.log(artifact_path=None, name=name, flavor=types.SimpleNamespace(__name__="cxr", save_model=_save),
                     keras_model=model, findings=tuple(findings), input_example=example, step=step,
                     registered_model_name=registered_model,
                     tags=tags, await_registration_for=60)


@dataclass
class LoadedModel:
    """A Keras model and where it came from (what an evaluation report and a promotion decision cite)."""

    model: Any
    uri: str
    run_id: str | None = None  # the MLflow run that trained it (None for a checkpoint folder)
    registered: tuple[str, str] | None = None  # (registered model name, version)
    tags: dict[str, str] = field(default_factory=dict)  # the run's tags: data, fingerprint, code version
    findings: tuple[str, ...] = FINDINGS  # its outputs, in order: the label set it was trained on

    @property
    def image_size(self) -> int:
        return int(self.model.input_shape[1])


def _checked_findings(model: Any, names: list[str] | tuple[str, ...] | None, where: str) -> tuple[str, ...]:
    """The model's label set: stored names, or NIH's 14 for a model from before label sets; sized like its head."""
    outputs = int(model.output_shape[-1])
    found = tuple(names) if names else FINDINGS
    if len(found) != outputs:
        raise ValueError(f"{where}: {outputs} outputs but {len(found)} finding names"
                         + ("" if names else " (no findings.json: a model from before label sets is NIH's 14)"))
    return found


def load(uri: str, tracking_uri: str | None = None) -> LoadedModel:
    """A checkpoint folder (local or any fsspec URL) or an MLflow model URI → its Keras model, float32."""
    import keras

    keras.mixed_precision.set_global_policy("float32")
    if uri.startswith(("models:/", "runs:/")):
        return _from_mlflow(uri, tracking_uri)
    return _from_checkpoint(uri)


def _from_checkpoint(uri: str) -> LoadedModel:
    import tempfile

    import yaml

    from cxr import config, storage
    from cxr.training import checkpoints

    with tempfile.TemporaryDirectory(prefix="cxr-model-") as local:
        if storage.is_local(uri):
            local = storage.filesystem(uri)[1]
        else:
            for name in (checkpoints.MODEL_FILE, checkpoints.CONFIG_FILE, checkpoints.STATE_FILE):
                storage.download(storage.join(uri, name), os.path.join(local, name))
        path = os.path.join(local, checkpoints.CONFIG_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{redact(uri)}: not a cxr checkpoint folder (no {checkpoints.CONFIG_FILE})")
        with open(path) as fh:
            cfg = config.validate(yaml.safe_load(fh), source=redact(path))
        model = checkpoints.load_model(local, cfg.model.name, cfg.data.image_size, cfg.model.dropout)
        findings = checkpoints.findings(local)
    from cxr.data.source import data_tags

    return LoadedModel(model, uri, tags=data_tags(cfg.data, redacted=False),  # split and sizes as trained
                       findings=_checked_findings(model, findings, redact(uri)))


def _from_mlflow(uri: str, tracking_uri: str | None) -> LoadedModel:
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    run_id, registered = None, None
    if uri.startswith("models:/") and not uri.startswith("models:/m-"):
        name, _, ref = uri[len("models:/"):].partition("@")
        if ref:  # an alias
            version = client.get_model_version_by_alias(name, ref)
        else:
            name, _, number = name.rpartition("/")
            version = client.get_model_version(name, number)
        run_id, registered = version.run_id, (version.name, str(version.version))
    elif uri.startswith("models:/m-"):
        run_id = client.get_logged_model(uri[len("models:/"):]).source_run_id
    else:
        run_id = uri[len("runs:/"):].split("/", 1)[0]
    import tempfile

    from cxr.tracking import pyfunc

    # One model download, not a progress bar per file through the caller's own progress or table.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="cxr-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        model = mlflow.keras.load_model(local)
        stored = os.path.join(local, "data", pyfunc.FINDINGS_FILE)
        names = None
        if os.path.exists(stored):
            with open(stored) as fh:
                names = json.load(fh)
    tags = dict(client.get_run(run_id).data.tags) if run_id else {}
    return LoadedModel(model, uri, run_id, registered, tags, _checked_findings(model, names, uri))
