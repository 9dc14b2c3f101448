"""`cxr sweep`: SPACE.yaml refused before Ray starts, naming the key; a real sweep on a local Ray (Ray Tune over
Ray Train, ASHA) recorded in MLflow as a parent and its children, the best trial registered, a failing trial
reported without killing the sweep, and a re-submit that trains nothing new."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time

import pytest
import yaml

from cxr import sweep
from cxr.config import ConfigError, validate
from tests.conftest import quiet_env, tiny_run

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")
BASE = {"data": {"manifest_uri": "m.json"}}


def _space(text: str) -> sweep.Space:
    return sweep.parse(yaml.safe_load(text), BASE, source="space.yaml")


def _refused(text: str) -> str:
    with pytest.raises(sweep.SpaceError) as err:
        _space(text)
    return str(err.value)


def test_unknown_key_is_named_with_a_suggestion():
    msg = _refused("space: {optim.lrr: {loguniform: [1.0e-4, 1.0e-2]}}")
    assert "space.yaml" in msg and "optim.lrr" in msg and "did you mean optim.lr?" in msg


def test_impossible_ranges_and_unknown_distributions_are_named():
    assert "space.optim.lr: impossible range: loguniform [0, 0.01] needs lo > 0" in _refused(
        "space: {optim.lr: {loguniform: [0, 1.0e-2]}}")
    assert "space.model.dropout: impossible range: uniform [0.5, 0.1] needs lo < hi" in _refused(
        "space: {model.dropout: {uniform: [0.5, 0.1]}}")
    assert "unknown distribution 'logunifrom' (did you mean loguniform?)" in _refused(
        "space: {optim.lr: {logunifrom: [1.0e-4, 1.0e-2]}}")
    assert "uniform takes [lo, hi]" in _refused("space: {optim.lr: {uniform: [1.0e-4]}}")


def test_values_the_schema_refuses_are_named():
    msg = _refused("space: {model.name: {choice: [small_cnn, resnet_9000]}}")
    assert "space.model.name: the config refuses 'resnet_9000'" in msg and "unknown model" in msg
    assert "space.model.dropout: the config refuses 1.0" in _refused("space: {model.dropout: {uniform: [0.0, 1.0]}}")
    # an integer key cannot take a continuous range: the point inside is not a whole number
    assert "space.optim.batch_size" in _refused("space: {optim.batch_size: {uniform: [8, 32]}}")
    # cross-field rules too: a cosine schedule's lr must stay above min_lr
    with pytest.raises(sweep.SpaceError, match="space.optim.lr: the config refuses 1e-09.*min_lr"):
        sweep.parse({"space": {"optim.lr": {"grid": [1e-3, 1e-9]}}}, {**BASE, "optim": {"lr_schedule": "cosine"}})


def test_asha_trials_and_metric_are_checked():
    assert "asha: unknown setting 'grace'" in _refused("space: {optim.lr: {grid: [0.1]}}\nasha: {grace: 1}")
    assert "reduction_factor must be a whole number >= 2" in _refused(
        "space: {optim.lr: {grid: [0.1]}}\nasha: {reduction_factor: 1}")
    assert "metric must name a validation metric" in _refused("space: {optim.lr: {grid: [0.1]}}\nmetric: loss")
    assert "unknown top-level key 'trails' (did you mean trials?)" in _refused(
        "space: {optim.lr: {grid: [0.1]}}\ntrails: 3")


def test_a_valid_space_parses_and_its_samples_become_typed_overrides():
    space = _space("space: {optim.lr: {loguniform: [1.0e-4, 1.0e-2]}, model.name: {choice: [small_cnn]}}\n"
                   "asha: {grace_period: 2, reduction_factor: 3}")
    assert (space.trials, space.metric, space.grace_period, space.reduction_factor) == (8, "val_auroc_mean", 2, 3)
    assert space.params()["space.optim.lr"] == "loguniform[0.0001, 0.01]"
    assert _space("space: {optim.lr: {grid: [0.1, 0.01]}}").trials == 1  # a grid: each point once by default
    assert sweep.overrides({"optim.lr": 1e-9, "model.name": "small_cnn"}) == [
        "model.name=\"small_cnn\"", "optim.lr=1.0e-09"]
    from cxr.config import apply_overrides

    cfg = validate(apply_overrides(BASE, sweep.overrides({"optim.lr": 1e-9, "optim.min_lr": 1e-12})))
    assert cfg.optim.lr == 1e-9  # a float, not the text YAML 1.1 makes of `1e-09`
    with pytest.raises(ConfigError):
        validate(apply_overrides(BASE, sweep.overrides({"optim.lr": "fast"})))


def test_concurrent_trials_are_what_the_nodes_hold_given_each_trials_workers():
    from cxr.tuning import max_concurrent

    def cfg(*overrides: str):
        from cxr.config import apply_overrides

        return validate(apply_overrides(BASE, overrides))

    nodes = [{"CPU": 4.0}, {"CPU": 4.0, "GPU": 2.0}]
    assert max_concurrent(cfg("scaling.num_workers=2"), nodes) == 4  # 8 one-CPU workers, 2 per trial
    assert max_concurrent(cfg("scaling.num_workers=3", "scaling.resources_per_worker={CPU: 2}"), nodes) == 1
    assert max_concurrent(cfg("scaling.num_workers=1", "scaling.use_gpu=true"), nodes) == 2  # the GPUs bound it
    assert max_concurrent(cfg("scaling.num_workers=4", "scaling.use_gpu=true"), nodes) == 1  # never 0: Tune waits


def test_cxr_sweep_refuses_a_bad_space_before_ray_starts(tmp_path):
    (tmp_path / "space.yaml").write_text("space:\n  optim.lrr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    out = subprocess.run([sys.executable, "-m", "cxr.cli", "sweep", "--config", DEMO, "--space", "space.yaml"],
                         cwd=tmp_path, env=quiet_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "optim.lrr" in out.stderr and "did you mean optim.lr?" in out.stderr
    assert "local Ray" not in out.stderr and not (tmp_path / "demo-out").exists()


# --------------------------------------------------------------------------- a real sweep on a local Ray

SPACE = """space:
  optim.lr: {grid: [3.0e-3, 1.0e-3, 1.0e-10, 1.0e+30]}   # 1e-10 learns nothing; 1e+30 diverges (training raises)
asha: {grace_period: 1, reduction_factor: 2}
name: lr-sweep
"""


@pytest.fixture(scope="module")
def swept(phantom_shards, tmp_path_factory) -> dict:
    """One sweep of 4 trials of 3 epochs (1 worker each) with --promote, then the same sweep re-submitted."""
    base = tmp_path_factory.mktemp("sweep")
    (base / "space.yaml").write_text(SPACE)
    uri = f"sqlite:///{base}/mlflow.db"
    argv = [sys.executable, "-m", "cxr.cli", "sweep", "--config", DEMO, "--space", "space.yaml",
            *tiny_run(phantom_shards, str(base / "ray"), "lr", uri, epochs=3), "scaling.num_workers=1",
            "run.max_failures=0", "optim.min_lr=1.0e-12", "tracking.registered_model=swept", "--promote"]
    runs = []
    for _ in range(2):
        t0 = time.monotonic()
        out = subprocess.run(argv, cwd=base, env=quiet_env(), capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
        runs.append((out, time.monotonic() - t0, _checkpoints(base / "ray" / "lr-sweep" / "trials")))
    return {"base": base, "uri": uri, "runs": runs}


def _checkpoints(trials) -> set[str]:
    return {os.path.join(d, c) for d in os.listdir(trials) for c in os.listdir(trials / d)
            if c.startswith("checkpoint_")}


def test_sweep_records_parent_children_stops_failures_and_registers_the_best(swept):
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(swept["uri"])
    exp = client.get_experiment_by_name("cxr-tests")
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.`mlflow.runName` = 'lr-sweep'")
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4 and parent.info.status == "FINISHED"
    assert parent.data.params["space.optim.lr"] == "grid[0.003, 0.001, 1e-10, 1e+30]"
    assert parent.data.params["sweep.scheduler"].startswith("ASHA(time_attr=epoch, grace_period=1")
    table = list(csv.DictReader(io.StringIO(open(mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id, artifact_path="trials.csv", tracking_uri=swept["uri"])).read())))
    by_lr = {float(r["optim.lr"]): r for r in table}
    assert set(by_lr) == {3e-3, 1e-3, 1e-10, 1e30}
    # the trial that diverged is reported and did not kill the sweep
    assert by_lr[1e30]["status"] == "FAILED" and "diverged" in by_lr[1e30]["stop_reason"]
    # the trial that learns nothing trails the others at ASHA's first rung and is stopped there
    assert by_lr[1e-10]["stop_reason"] == "stopped by ASHA at epoch 1" and by_lr[1e-10]["epochs_run"] == "1"
    finished = [r for r in table if r["status"] == "FINISHED"]
    assert any(r["stop_reason"] == "completed 3 epochs" for r in finished)
    best = max(finished, key=lambda r: float(r["best_val_metric"]))
    assert parent.data.tags["cxr.sweep.best"] == best["trial"]
    assert float(by_lr[1e-10]["best_val_metric"]) < float(best["best_val_metric"])
    child = {c.data.tags["cxr.sweep.trial"]: c for c in children}
    for row in table:
        c = child[row["trial"]]
        assert c.data.tags["cxr.sweep.stop_reason"] == row["stop_reason"] and c.info.run_id == row["mlflow_run_id"]
        assert c.info.status == ("FAILED" if row["status"] == "FAILED" else "FINISHED")
        if row["status"] == "FINISHED":  # the per-epoch series of a `cxr train` run, also for a trial ASHA stopped
            epochs = client.get_metric_history(c.info.run_id, "epoch/val_auroc/mean")
            assert sorted(m.step for m in epochs) == list(range(1, int(row["epochs_run"]) + 1))
            assert any(k.startswith("epoch/val_auroc/") for k in c.data.metrics)
    (version,) = client.search_model_versions("name='swept'")
    assert version.run_id == child[best["trial"]].info.run_id
    assert version.tags["cxr.data.fingerprint"] and version.tags["val_auroc_mean"] == best["best_val_metric"]
    assert "test_auroc_mean" in client.get_run(version.run_id).data.metrics
    assert str(client.get_model_version_by_alias("swept", "champion").version) == "1"  # --promote: the first champion
    first = swept["runs"][0][0].stdout
    assert "stopped by ASHA at epoch 1" in first and f"best: {best['trial']}, registered as version 1" in first
    # Every Train run removed its own workers' placement group, the one ASHA stopped included (it aborted its run):
    # none was left to Ray Train's placement-group cleaner, which says so when it has to step in (and when it
    # cannot reach Ray's State API, never frees the CPUs, and the next trials wait for ever).
    assert "Detected that the Ray Train controller actor" not in swept["runs"][0][0].stderr


def test_a_resubmitted_sweep_trains_nothing_new(swept):
    from mlflow.tracking import MlflowClient

    (first, _, before), (again, seconds, after) = swept["runs"]
    assert after == before  # no trial trained again: not one new checkpoint
    assert "registered as version 1 (already)" in again.stdout
    assert len(MlflowClient(swept["uri"]).search_model_versions("name='swept'")) == 1
    assert first.stdout.splitlines()[1:6] == again.stdout.splitlines()[1:6]  # the same trials' table
