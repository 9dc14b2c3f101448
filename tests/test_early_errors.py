"""cxr refuses what cannot work before it starts Ray, imports TensorFlow or opens an MLflow run, with a message that
says why: `cxr train`'s config and data, `cxr predict`'s and `cxr explain`'s images, a model store not named."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT, quiet_env, tiny_run

from cxr import config
from cxr.data import source
from cxr.training import driver


def _train(tmp_path, *overrides: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "cxr.cli", "train", "--config", os.path.join(ROOT, "configs", "demo.yaml"),
           *overrides]
    t0 = time.monotonic()
    out = subprocess.run(cmd, cwd=tmp_path, env=quiet_env(), capture_output=True, text=True, timeout=timeout)
    return out, time.monotonic() - t0


def test_missing_manifest_fails_before_ray_and_mlflow(tmp_path):
    db = tmp_path / "mlflow.db"
    out, seconds = _train(tmp_path, *tiny_run(str(tmp_path / "nowhere" / "manifest.json"), str(tmp_path / "runs"),
                                              "lost", f"sqlite:///{db}"))
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"{tmp_path}/nowhere/manifest.json: no such file" in out.stderr
    assert not db.exists(), "an MLflow run was opened for a run that could not start"
    assert "Started a local Ray instance" not in out.stderr and "started a local Ray" not in out.stderr


def _fails_early(cwd, *args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """A cxr command run as a user runs it, and the modules it imported (`python -X importtime`)."""
    env = quiet_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "cxr.cli", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    return out, imported


def test_missing_images_or_model_store_fail_before_ray_and_tensorflow(tmp_path):
    """Before: `cxr predict --images /no/such/path` started Ray, took 37-44 s and said "predicted 0 of 1", exit 0;
    `cxr evaluate --model models:/…` without a store made an empty ./mlflow.db and said the model was not found."""
    model = tmp_path / "checkpoint"  # a checkpoint folder as `cxr predict` describes one: its resolved config
    config.write_resolved(config.validate({"data": {"manifest_uri": "m"}}), str(model / "resolved.yaml"))
    gone = str(tmp_path / "no" / "such" / "path")
    for command in (["predict", "--out", str(tmp_path / "p.csv")], ["explain", "--out", str(tmp_path / "x")]):
        out, imported = _fails_early(tmp_path, *command, "--model", str(model), "--images", gone)
        assert out.returncode == 2 and f"cxr {command[0]}: error: no such file or folder: {gone}" in out.stderr
        assert not {"ray", "tensorflow"} & imported, out.stderr[-2000:]
    out, imported = _fails_early(tmp_path, "evaluate", "--model", "models:/nih@champion")
    assert out.returncode == 2 and "pass --tracking-uri URI (or set MLFLOW_TRACKING_URI)" in out.stderr
    assert not {"ray", "tensorflow", "mlflow"} & imported and not (tmp_path / "mlflow.db").exists()


def test_upsampling_is_refused_unless_allowed(phantom_shards, tmp_path):
    raw = config.apply_overrides({"data": {"manifest_uri": phantom_shards}}, ["data.image_size=96"])
    cfg = config.validate(raw)
    with pytest.raises(ValueError, match=r"data.image_size 96 is larger than the 64 px images stored in .*"
                                         r"upsampled.*--size 96.*data.allow_upsample=true"):
        driver.plan_run(cfg, source.SHARDS)
    allowed = config.validate(config.apply_overrides(raw, ["data.allow_upsample=true"]))
    assert driver.plan_run(allowed, source.SHARDS).train_size > 0


@pytest.mark.parametrize("bundle, nodes, fit", [
    ({"CPU": 1.0}, [{"CPU": 2.0}], 2),
    ({"CPU": 1.0}, [{"CPU": 2.0}, {"CPU": 3.0}], 5),
    ({"CPU": 4.0, "GPU": 1.0}, [{"CPU": 16.0, "GPU": 2.0}, {"CPU": 2.0, "GPU": 4.0}], 2),
    ({"CPU": 1.5}, [{"CPU": 2.0}, {"CPU": 2.0}], 2),  # a worker never spans nodes
])
def test_workers_that_fit(bundle, nodes, fit):
    assert driver.workers_that_fit(bundle, nodes) == fit


@pytest.mark.slow
def test_more_workers_than_the_local_ray_has_is_refused_at_once(phantom_shards, tmp_path):
    db = tmp_path / "mlflow.db"
    out, seconds = _train(tmp_path, *tiny_run(phantom_shards, str(tmp_path / "runs"), "greedy", f"sqlite:///{db}"),
                          "scaling.num_workers=8")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "scaling.num_workers=8 workers of {'CPU': 1.0} need {'CPU': 8.0}; this machine's local Ray has" in out.stderr
    assert seconds < 120, f"took {seconds:.0f} s"  # Ray Train itself would retry every 60 s, forever
    assert not db.exists()
