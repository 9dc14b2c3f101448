"""`cxr train` refuses what cannot work before it starts Ray or opens an MLflow run, with a message that says why."""

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
    assert f"{tmp_path}/nowhere/manifest.json: no such object" in out.stderr
    assert not db.exists(), "an MLflow run was opened for a run that could not start"
    assert "Started a local Ray instance" not in out.stderr and "started a local Ray" not in out.stderr


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
