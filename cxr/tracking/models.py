"""Models into MLflow: the best epoch's model logged with two faces (loading any URI back: `cxr.models.loading`).

A logged model carries the Keras flavour (`data/model.keras`, stock layers only, so `mlflow.keras.load_model`
works without cxr) and a python_function flavour whose loader is `cxr.tracking.pyfunc`, shipped inside the
model, so `mlflow.pyfunc.load_model` works in any interpreter and returns a table named by the model's own
findings (`data/findings.json`; a model from before label sets has none and is NIH's 14). The signature names
those outputs; it declares no input dtype, because uint8 (0-255) and float (0-1) images
are both accepted and checked by the loader itself. The input example is a uint8 batch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import types
from typing import Any

from cxr.labels import FINDINGS

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

    from cxr.models import loading
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
    with open(os.path.join(path, "data", loading.FINDINGS_FILE), "w") as fh:
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

    from cxr.models import loading

    size = int(model.input_shape[1])
    if len(findings) != int(model.output_shape[-1]):
        raise ValueError(f"{len(findings)} finding names for a model with {model.output_shape[-1]} outputs")
    example = np.zeros((1, size, size, 1), np.uint8)
    return Model.log(artifact_path=None, name=name, flavor=types.SimpleNamespace(__name__="cxr", save_model=_save),
                     keras_model=model, findings=tuple(findings), input_example=example, step=step,
                     registered_model_name=registered_model, metadata={loading.IMAGE_SIZE: size},
                     tags=tags, await_registration_for=60)
