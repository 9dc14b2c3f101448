"""The tracking stage against a real `mlflow server`: one run per training run, epochs logged once, live."""

from __future__ import annotations

import logging
import uuid

from conftest import free_port
from mlflow.tracking import MlflowClient

from cxr.tracking import runs
from cxr.tracking.handlers import EpochLogger


def _row(epoch: int, auroc: float) -> dict:
    return {"epoch": epoch, "lr": 1e-3, "loss": 0.5, "val_auroc_mean": auroc, "val_auroc/Mass": auroc,
            "val_auroc/Hernia": float("nan"), "is_best": True}


def test_open_run_creates_once_and_finds_by_key(mlflow_server):
    key = f"/runs/{uuid.uuid4().hex}"
    params = runs.safe_params({"data": {"manifest_uri": "s3://user:hunter2@bucket/m.json"},
                                   "tracking": {"api_token": "t0k3n"}, "optim": {"lr": 0.001}})
    run_id = runs.open_run(mlflow_server, "cxr-tracking-tests", "first", key, params)
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags[runs.RUN_TAG] == key
    assert run.data.params["optim.lr"] == "0.001"
    assert "hunter2" not in run.data.params["data.manifest_uri"] and "runs.api_token" not in run.data.params

    runs.end_run(mlflow_server, run_id, "FAILED")
    assert client.get_run(run_id).info.status == "FAILED"
    again = runs.open_run(mlflow_server, "cxr-tracking-tests", "second", key, params)
    assert again == run_id and client.get_run(run_id).info.status == "RUNNING"  # a re-submitted run resumes it
    other = runs.open_run(mlflow_server, "cxr-tracking-tests", "first", key + "-b", params)
    assert other != run_id


def test_each_epoch_is_logged_once_across_restarts(mlflow_server):
    run_id = runs.open_run(mlflow_server, "cxr-tracking-tests", "epochs", f"/runs/{uuid.uuid4().hex}", {})
    first = EpochLogger(mlflow_server, run_id)
    assert first.log(_row(1, 0.61)) and first.log(_row(2, 0.72))
    restarted = EpochLogger(mlflow_server, run_id)  # a new worker group after resuming from epoch 2
    assert restarted.log(_row(2, 0.99)) and restarted.log(_row(3, 0.80))

    client = MlflowClient(mlflow_server)
    history = client.get_metric_history(run_id, "val_auroc_mean")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.61), (2, 0.72), (3, 0.80)]
    assert [m.value for m in client.get_metric_history(run_id, "val_auroc/Mass")] == [0.61, 0.72, 0.80]
    metrics = client.get_run(run_id).data.metrics
    assert "val_auroc/Hernia" not in metrics and "is_best" not in metrics and "epoch" not in metrics
    assert runs.logged_epochs(client, run_id) == {1, 2, 3}


def test_unreachable_server_warns_without_credentials_and_never_raises(monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    caplog.set_level(logging.WARNING, logger="cxr")
    uri = f"http://trainer:s3cr3t-pw@127.0.0.1:{free_port()}"  # nothing listens there
    log = EpochLogger(uri, "0" * 32)
    assert log.log(_row(1, 0.5)) is False  # training goes on; the driver logs the epoch at the end
    warnings = [r.getMessage() for r in caplog.records if r.name == "cxr.tracking.handlers"]
    assert any("epoch 1 not logged now" in w for w in warnings)
    assert "s3cr3t-pw" not in caplog.text


def test_a_run_resumes_in_a_process_whose_active_experiment_is_another(tmp_path):
    """A notebook (or a test) that called mlflow.set_experiment for another experiment can still train."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)  # artifacts beside the store, not in ./mlruns of the checkout
    mlflow.set_experiment(experiment_id=runs.experiment_id(MlflowClient(uri), "somebody-elses",
                                                           runs.artifact_location(uri)))
    run_id = runs.open_run(uri, "cxr-resume-tests", "resumed", f"/runs/{uuid.uuid4().hex}", {})
    with runs.resume(uri, run_id) as active:
        assert active.info.run_id == run_id
        mlflow.log_metric("m", 1.0)
    assert MlflowClient(uri).get_run(run_id).data.metrics == {"m": 1.0}


def test_the_printed_runs_url_opens_the_experiments_runs_in_the_training_view(tmp_path):
    """MLflow 3.17 opens experiments on its GenAI view whatever their tag: the URL names the training view and
    the experiment's real id (a second experiment, so the id is not the first one's by luck)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    first = runs.experiment_id(client, "first")
    real = runs.experiment_id(client, "second", runs.artifact_location(uri))
    line = runs.ui_hint(uri, "second")
    assert f"http://127.0.0.1:5000/#/experiments/{real}/runs?workflowType=machine_learning " in line
    assert f"mlflow ui --backend-store-uri {uri}" in line and real != first
    served = runs.ui_line("http://bob:s3cret@mlflow:5000/", real)
    assert served.endswith(f"@mlflow:5000/#/experiments/{real}/runs?workflowType=machine_learning")
    assert "s3cret" not in served
