"""The tracking stage: one MLflow run per training run, resumed (same run id) when training resumes.

The driver opens the run before training (params, status RUNNING), rank 0 logs each epoch's metrics as
soon as its checkpoint is reported (so a long run can be watched, and a dead one is still on record), and
the driver finishes it: epochs not yet logged, test scores, plots, the model, and FINISHED or FAILED.
An epoch is logged once: a restarted worker group re-runs epochs after its checkpoint, and the first
value logged for an epoch stays. Only the rank-0 worker and the driver talk to MLflow.

Parameters are the resolved config, flattened, with URLs stripped of any user:password part and
secret-looking keys dropped: credentials live in the environment and must never reach a tracking server.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from cxr.redact import redact

log = logging.getLogger(__name__)
RUN_TAG = "cxr.run"  # the run's storage path: a re-submitted run finds its MLflow run by it
SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|access_key)", re.IGNORECASE)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def safe_params(config: Mapping[str, Any]) -> dict[str, str]:
    """Flattened config fit for MLflow params: no secret-looking keys, no credentials inside URLs."""
    params = {}
    for key, value in flatten(config).items():
        if SECRET_KEY.search(key):
            continue
        text = "" if value is None else str(value)
        params[key] = redact(text)[:6000]
    return params


def finite_numbers(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite int/float entries of a metrics row as floats (flags, NaN AUROCs and text left out)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))}


SUMMARY_KEYS = ("epoch", "best_epoch", "best_val_auroc_mean")  # running values: logged once, at the best epoch


def epoch_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """An epoch's metrics as MLflow takes them: finite numbers only; "val_auroc/Mass" keeps its "/", by which
    the MLflow UI groups the per-finding charts into one section per split."""
    return {k: v for k, v in finite_numbers(row).items() if k not in SUMMARY_KEYS}


def run_tags(cfg: Any, fingerprint: str) -> dict[str, str]:
    """What a run was made of, so runs can be compared and a model traced back: data, code, libraries, cluster."""
    import importlib.metadata as md

    from cxr.data.source import data_tags, synthetic

    data = cfg.data
    tags = {**data_tags(data), "cxr.data.fingerprint": fingerprint, "cxr.data.synthetic": str(synthetic(data)).lower(),
            "cxr.splits": f"train={data.train_split},val={data.val_split},test=test", "cxr.git_commit": git_commit()}
    for package in ("cxr", "tensorflow", "keras", "ray", "mlflow"):
        try:
            tags[f"cxr.version.{package}"] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return tags


def git_commit() -> str:
    """The code's commit: $CXR_GIT_COMMIT (set where the image is built), else the checkout's, else unknown."""
    import subprocess

    if os.environ.get("CXR_GIT_COMMIT"):
        return os.environ["CXR_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def cluster_tags() -> dict[str, str]:
    """The Ray cluster the run trained on: nodes, CPUs, GPUs and accelerator types."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    accelerators = sorted({k.split(":", 1)[1] for n in nodes for k in n["Resources"]
                           if k.startswith("accelerator_type:")})
    return {"cxr.cluster.nodes": str(len(nodes)),
            "cxr.cluster.cpus": f"{sum(n['Resources'].get('CPU', 0) for n in nodes):g}",
            "cxr.cluster.gpus": f"{sum(n['Resources'].get('GPU', 0) for n in nodes):g}",
            "cxr.cluster.accelerators": ",".join(accelerators) or "none"}


def placement_tags() -> dict[str, str]:
    """Which nodes this job's Ray Train workers ran on (from Ray's State API; empty if it cannot be asked)."""
    import ray
    from ray.util.state import list_actors

    context = ray.get_runtime_context()
    try:  # by address: with no address the State API guesses, and fails when a machine runs two Rays
        actors = list_actors(address=context.gcs_address, detail=True, limit=10_000, raise_on_missing_output=False,
                             filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", context.get_job_id())])
    except Exception as exc:  # noqa: BLE001 - a record worth having, never worth failing a run for
        log.warning("could not ask Ray where the workers ran: %s", redact(str(exc)))
        return {}
    nodes = sorted({a.node_id for a in actors if a.node_id})
    return {"cxr.cluster.train_nodes": str(len(nodes)), "cxr.cluster.train_node_ids": ",".join(nodes)}


def log_datasets(client: Any, run_id: str, cfg: Any, fingerprint: str, sizes: Mapping[str, int]) -> None:
    """The run's data as MLflow inputs, one per split with its context, so the UI shows which data trained it."""
    import warnings

    import mlflow.data
    import pandas as pd
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for context, split in (("training", cfg.data.train_split), ("validation", cfg.data.val_split), ("test", "test")):
        frame = pd.DataFrame({"split": [split], "images": [float(sizes.get(split, 0))]})
        with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways": all mean the file
            warnings.simplefilter("ignore", UserWarning)
            ds = mlflow.data.from_pandas(frame, source=redact(cfg.data.location), name=f"{split}",
                                         digest=fingerprint[:36]).to_dict()
        inputs.append(DatasetInput(Dataset(ds["name"], ds["digest"], ds["source_type"], ds["source"],
                                           ds.get("schema"), ds.get("profile")),
                                   tags=[InputTag("mlflow.data.context", context)]))
    client.log_inputs(run_id, datasets=inputs)


def logged_epochs(client: Any, run_id: str) -> set[int]:
    """Epochs on record: every epoch logs the validation mean AUROC."""
    from cxr.evaluation.metrics import SCORE

    return {int(m.step) for m in client.get_metric_history(run_id, SCORE)}


def log_epoch(client: Any, run_id: str, row: Mapping[str, Any]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    step = int(row["epoch"])
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in epoch_metrics(row).items()])


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # model training, not GenAI traces


def artifact_location(tracking_uri: str, configured: str | None = None) -> str | None:
    """Where a new experiment keeps its artifacts: as configured, else beside a SQLite store (`mlartifacts/`
    next to the .db: MLflow's own default is ./mlruns of whatever folder a command ran in), else the server's
    (which proxies them)."""
    if configured:
        return configured if "://" in configured else os.path.abspath(configured)
    if tracking_uri.startswith("sqlite:///"):
        return os.path.join(os.path.dirname(os.path.abspath(tracking_uri[len("sqlite:///"):])), "mlartifacts")
    return None


def experiment_id(client: Any, experiment: str, location: str | None = None) -> str:
    """The experiment's id, creating it (marked as model training, artifacts at `location`) if it is new."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return client.create_experiment(experiment, artifact_location=location, tags=EXPERIMENT_KIND)
    if exp.tags.get("mlflow.experimentKind") is None:
        client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    return exp.experiment_id


def open_run(tracking_uri: str, experiment: str, run_name: str, key: str, params: Mapping[str, str],
             location: str | None = None, tags: Mapping[str, str] | None = None) -> str:
    """The MLflow run tagged `key` (status set back to RUNNING), or a new one with `params`; its id."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp_id = experiment_id(client, experiment, location)
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_TAG}` = '{key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        changed = sorted(k for k, v in params.items() if found[0].data.params.get(k, v) != v)
        if changed:  # MLflow params cannot change: the run keeps the values it started with
            log.warning("resuming MLflow run %s, whose params differ from this config in %s; the run keeps "
                        "its first values", run_id, ", ".join(changed[:10]) + (" …" if len(changed) > 10 else ""))
        client.update_run(run_id, status="RUNNING")
        for k, v in (tags or {}).items():
            client.set_tag(run_id, k, v)
        return run_id
    run_id = client.create_run(exp_id, run_name=run_name, tags={RUN_TAG: key, **(tags or {})}).info.run_id
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i:i + 100])
    return run_id


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


@contextmanager
def resume(tracking_uri: str, run_id: str, system_metrics: bool = False) -> Iterator[Any]:
    """Make the run `open_run` created the active MLflow run (for the fluent log_* calls); yields it. Ends it
    FINISHED, or FAILED (KILLED on Ctrl-C) if the block raises. `system_metrics`: the driver's host's CPU,
    memory, disk and network every 10 s while the block runs."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    # the process's active experiment (a caller's mlflow.set_experiment) must be the run's, or MLflow refuses it
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient(tracking_uri).get_run(run_id).info.experiment_id)
    active = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
    try:
        yield active
    except BaseException as exc:
        mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    else:
        mlflow.end_run()


def log_figure(fig: Any, name: str) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    mlflow.log_figure(fig, name)
    plt.close(fig)


def log_text(text: str, name: str) -> None:
    import mlflow

    mlflow.log_text(text, name)


UI = "http://127.0.0.1:5000"  # where `mlflow ui` (and `mlflow server`) listen unless told otherwise
TRAINING_VIEW = "workflowType=machine_learning"  # the UI's "Model training" view, whatever the browser chose last


def runs_url(tracking_uri: str, experiment_id: str) -> str:
    """The MLflow UI's runs table of an experiment, opened in its "Model training" view.

    MLflow 3.17's UI ignores the `mlflow.experimentKind` tag: its sidebar toggle (remembered per browser,
    GenAI at first) decides, unless the URL's `workflowType` query says. Its router is a hash router and the
    runs table's route is /experiments/<id>/runs. A file or database store has no UI address: `mlflow ui`'s."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else UI
    return f"{base}/#/experiments/{experiment_id}/runs?{TRAINING_VIEW}"


def ui_hint(tracking_uri: str, experiment: str) -> str:
    """Where to look at an experiment's runs: the URL, and for a local store the command that serves it."""
    from mlflow.tracking import MlflowClient

    found = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"{redact(tracking_uri)}: no experiment {experiment!r}")
    return ui_line(tracking_uri, found.experiment_id)


def ui_line(tracking_uri: str, experiment_id: str) -> str:
    """`ui_hint`'s line for a known experiment id (credentials in the URI are redacted)."""
    url = redact(runs_url(tracking_uri, experiment_id))
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow runs: {url}"
    return f"MLflow runs: {url}  (serve it with: mlflow ui --backend-store-uri {redact(tracking_uri)})"


def default_uri(base: str = ".") -> str:
    """The local default: a SQLite store beside the demo output (MLflow's UI reads it with `mlflow ui`)."""
    return f"sqlite:///{os.path.abspath(os.path.join(base, 'mlflow.db'))}"
