"""Any model URI loaded back: a checkpoint folder, `runs:/…`, `models:/NAME/VERSION`, `@ALIAS` or `models:/m-…`.

Owned below evaluation, inference and tracking (they all load models; none reaches upwards to do it): the
Keras model in float32, its label set (`data/findings.json` of a logged model, the checkpoint's state, or
NIH's 14 for a model from before label sets) and where it came from (run, registered version, run tags).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from cxr.labels import FINDINGS
from cxr.redact import redact

FINDINGS_FILE = "findings.json"  # beside a logged model's model.keras (cxr/tracking/pyfunc.py reads the same name)
IMAGE_SIZE = "cxr.image_size"  # a logged model's MLmodel metadata: its input side, read without loading it


@dataclass
class LoadedModel:
    """A Keras model (None when only described) and where it came from (what reports and decisions cite)."""

    model: Any
    uri: str
    run_id: str | None = None  # the MLflow run that trained it (None for a checkpoint folder)
    registered: tuple[str, str] | None = None  # (registered model name, version)
    tags: dict[str, str] = field(default_factory=dict)  # the run's tags: data, fingerprint, code version
    findings: tuple[str, ...] = FINDINGS  # its outputs, in order: the label set it was trained on
    model_id: str | None = None  # MLflow's LoggedModel id (m-…): what saved predictions are matched on
    size: int | None = None  # the input side, when described without loading the model
    version_tags: dict[str, str] = field(default_factory=dict)  # the registered version's (what evaluate stored)

    @property
    def image_size(self) -> int:
        return self.size if self.model is None else int(self.model.input_shape[1])

    @property
    def pinned(self) -> str:
        """A URI of exactly this model, for other processes to load: an alias may move meanwhile, a version not."""
        if self.model_id:
            return f"models:/{self.model_id}"
        return f"models:/{self.registered[0]}/{self.registered[1]}" if self.registered else self.uri


def _checked_findings(model: Any, names: list[str] | tuple[str, ...] | None, where: str) -> tuple[str, ...]:
    """The model's label set: stored names, or NIH's 14 for a model from before label sets; sized like its head
    (when the model was loaded)."""
    found = tuple(names) if names else FINDINGS
    if model is None:
        return found
    outputs = int(model.output_shape[-1])
    if len(found) != outputs:
        raise ValueError(f"{where}: {outputs} outputs but {len(found)} finding names"
                         + ("" if names else " (no findings.json: a model from before label sets is NIH's 14)"))
    return found


def require_tracking(uri: str, tracking_uri: str | None) -> None:
    """A runs:/ or models:/ URI with no tracking URI fails at once, unless ./mlflow.db (MLflow's default store, and
    cxr train's) is there: MLflow would otherwise make an empty one and say only that the model is not found."""
    if uri.startswith(("models:/", "runs:/")) and not tracking_uri and not os.path.exists("mlflow.db"):
        raise ValueError(f"{redact(uri)} is a model in an MLflow store, and no store was named (there is no "
                         "./mlflow.db here): pass --tracking-uri URI (or set MLFLOW_TRACKING_URI)")


def load(uri: str, tracking_uri: str | None = None) -> LoadedModel:
    """A checkpoint folder (local or any fsspec URL) or an MLflow model URI → its Keras model, float32."""
    import keras

    keras.mixed_precision.set_global_policy("float32")
    if uri.startswith(("models:/", "runs:/")):
        return _from_mlflow(uri, tracking_uri)
    return _from_checkpoint(uri)


def describe(uri: str, tracking_uri: str | None = None) -> LoadedModel:
    """What `load` says of a model but the model itself (input size, label set, provenance), for a driver that
    only sends the model's URI to the workers: no Keras import, no weights read. A model logged before its
    size was recorded (`cxr.image_size` in its MLmodel metadata) is loaded instead."""
    if uri.startswith(("models:/", "runs:/")):
        return _from_mlflow(uri, tracking_uri, weights=False)
    return _from_checkpoint(uri, weights=False)


def _from_checkpoint(uri: str, weights: bool = True) -> LoadedModel:
    import tempfile

    import yaml

    from cxr import config, storage
    from cxr.training import checkpoints

    model_file, config_file, state_file = checkpoints.MODEL_FILE, checkpoints.CONFIG_FILE, checkpoints.STATE_FILE
    with tempfile.TemporaryDirectory(prefix="cxr-model-") as local:
        if storage.is_local(uri):
            local = storage.filesystem(uri)[1]
        else:
            for name in (model_file, config_file, state_file) if weights else (config_file, state_file):
                if name != state_file or storage.exists(storage.join(uri, name)):
                    storage.download(storage.join(uri, name), os.path.join(local, name))
        path = os.path.join(local, config_file)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{redact(uri)}: not a cxr checkpoint folder (no {config_file})")
        with open(path) as fh:
            cfg = config.validate(yaml.safe_load(fh), source=redact(path))
        findings = None
        if os.path.exists(os.path.join(local, state_file)):  # a folder of weights and config alone has none
            with open(os.path.join(local, state_file)) as fh:
                findings = json.load(fh).get("plan", {}).get("findings")
        model = None
        if weights:
            model = checkpoints.load_model(local, cfg.model.name, cfg.data.image_size, cfg.model.dropout)
    from cxr.data.source import data_tags

    return LoadedModel(model, uri, tags=data_tags(cfg.data, redacted=False),  # split and sizes as trained
                       findings=_checked_findings(model, findings, redact(uri)), size=cfg.data.image_size)


def _from_mlflow(uri: str, tracking_uri: str | None, weights: bool = True) -> LoadedModel:
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    run_id, registered, model_id, version_tags = None, None, None, {}
    if uri.startswith("models:/") and not uri.startswith("models:/m-"):
        name, _, ref = uri[len("models:/"):].partition("@")
        if ref:  # an alias
            version = client.get_model_version_by_alias(name, ref)
        else:
            name, _, number = name.rpartition("/")
            version = client.get_model_version(name, number)
        run_id, registered, version_tags = version.run_id, (version.name, str(version.version)), dict(version.tags)
        model_id = version.source.removeprefix("models:/") if version.source.startswith("models:/m-") else None
    elif uri.startswith("models:/m-"):
        model_id = uri[len("models:/"):]
        run_id = client.get_logged_model(model_id).source_run_id
    else:
        run_id = uri[len("runs:/"):].split("/", 1)[0]
    tags = dict(client.get_run(run_id).data.tags) if run_id else {}
    pinned = LoadedModel(None, uri, run_id, registered, model_id=model_id).pinned  # not an alias that may move
    if not weights:
        info = mlflow.models.get_model_info(pinned)
        size = (info.metadata or {}).get(IMAGE_SIZE)
        outputs = info.signature.outputs.input_names() if info.signature and info.signature.outputs else None
        if size is not None and outputs and all(isinstance(n, str) for n in outputs):
            return LoadedModel(None, uri, run_id, registered, tags, tuple(outputs), model_id, int(size), version_tags)
    import tempfile

    # One model download, not a progress bar per file through the caller's own progress or table.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="cxr-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=tmp)
        model = mlflow.keras.load_model(local)
        stored = os.path.join(local, "data", FINDINGS_FILE)
        names = None
        if os.path.exists(stored):
            with open(stored) as fh:
                names = json.load(fh)
    return LoadedModel(model, uri, run_id, registered, tags, _checked_findings(model, names, uri), model_id,
                       version_tags=version_tags)
