"""The model lifecycle on real processes: a training run registers its model with its provenance, the model loads
where cxr is not installed, `cxr evaluate` reports with patient-level intervals, and `cxr promote` moves
@champion exactly when its rules say so, against real `mlflow server`s (one of them taken down on purpose).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ROOT, MlflowServer, quiet_env, tiny_run

from cxr.labels import FINDINGS

pytestmark = pytest.mark.slow
EPOCHS = 3


def _cli(*args: str, cwd, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr.cli", *args], cwd=cwd, env=env or quiet_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(phantom_shards, mlflow_server, tmp_path_factory) -> dict:
    """One `cxr train` of EPOCHS epochs, its model registered as "lifecycle"."""
    from mlflow.tracking import MlflowClient

    base = tmp_path_factory.mktemp("lifecycle")
    argv = ["train", "--config", os.path.join(ROOT, "configs", "demo.yaml"),
            *tiny_run(phantom_shards, str(base / "runs"), "life", mlflow_server, epochs=EPOCHS),
            "tracking.registered_model=lifecycle"]
    out = _cli(*argv, cwd=base)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("cxr-tests")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`mlflow.runName` = 'life'")
    return {"base": base, "argv": argv, "stdout": out.stdout, "run": run, "client": client, "experiment": exp,
            "manifest": phantom_shards}


def _fingerprint(manifest_uri: str) -> str:
    from cxr.data import manifest

    return manifest.load(manifest_uri).fingerprint


def test_training_registers_the_best_model_with_its_provenance(trained):
    client, run = trained["client"], trained["run"]
    rid = run.info.run_id
    (version,) = client.search_model_versions("name = 'lifecycle'")
    assert version.run_id == rid and "model: lifecycle version 1" in trained["stdout"]
    assert f"/#/experiments/{trained['experiment'].experiment_id}/runs?workflowType=machine_learning" in trained[
        "stdout"]  # the runs table, in MLflow's training view, of the experiment the run is in
    fingerprint = _fingerprint(trained["manifest"])
    assert version.tags["test_fingerprint"] == fingerprint and float(version.tags["test_auroc_mean"]) > 0
    tags = run.data.tags
    assert tags["cxr.data.fingerprint"] == fingerprint and tags["cxr.data"] == trained["manifest"]
    assert tags["cxr.cluster.nodes"] == "1" and float(tags["cxr.cluster.cpus"]) >= 2
    assert tags["cxr.git_commit"] and tags["cxr.version.tensorflow"].startswith("2.")
    assert tags["mlflow.runName"] == "life"
    from cxr.data import manifest
    from cxr.tracking import provenance

    learned = provenance.learned_from(client, rid)  # what it trained on, for a later promotion to leave out
    ids = {role: manifest.load(trained["manifest"]).patient_ids(role) for role in ("train", "val", "test")}
    assert (learned.train, learned.val, learned.fingerprint) == (set(ids["train"]), set(ids["val"]), fingerprint)
    assert not learned.seen & set(ids["test"]) and len(ids["train"]) > len(ids["val"]) > 0
    assert version.tags["cxr.patients.train.sha256"] == provenance.patients_hash(ids["train"])
    assert tags["cxr.patients.val.count"] == str(len(ids["val"]))
    contexts = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(contexts) == {"training", "validation", "test"}
    assert {d.digest for d in contexts.values()} == {fingerprint[:36]}
    assert trained["experiment"].tags["mlflow.experimentKind"] == "custom_model_development"

    best = int(run.data.metrics["best_epoch"])
    history = {key: [(m.step, m.value) for m in client.get_metric_history(rid, key)]
               for key in ("val_auroc/Mass", "test_auroc/Mass", "best_epoch", "val_auroc_mean")}
    assert [s for s, _ in history["val_auroc/Mass"]] == list(range(1, EPOCHS + 1))  # epochs count from 1
    assert [s for s, _ in history["test_auroc/Mass"]] == [best]  # at the best epoch, once
    assert history["best_epoch"] == [(best, float(best))]  # a summary, not a series that loops back
    assert any(k.startswith("system/") for k in run.data.metrics), "no system metrics"
    (logged,) = [m for m in client.search_logged_models([trained["experiment"].experiment_id])
                 if m.source_run_id == rid]
    assert logged.name == f"life-epoch{best}"
    linked = {(m.key, m.step) for m in logged.metrics}
    assert ("val_auroc_mean", best) in linked and ("test_auroc_mean", best) in linked


CHILD = textwrap.dedent("""
    import json, sys
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]  # cxr's editable install
    try:
        import cxr  # noqa: F401
        sys.exit("cxr is importable here: the test would prove nothing")
    except ModuleNotFoundError:
        pass
    import mlflow, numpy as np, pandas as pd
    x = np.load(sys.argv[1])
    keras_model = mlflow.keras.load_model("models:/lifecycle/1")
    pyfunc = mlflow.pyfunc.load_model("models:/lifecycle/1")
    frame = pyfunc.predict(x)
    try:
        pyfunc.predict(pd.DataFrame({"pixels": [1, 2]}))
        refusal = None
    except Exception as exc:
        refusal = str(exc)
    np.savez(sys.argv[2], keras=keras_model.predict(x.astype("float32") / 255, verbose=0), pyfunc=frame.values,
             frame=pyfunc.predict(pd.DataFrame({"image": list(x)})).values)
    print(json.dumps({"columns": list(frame.columns), "refusal": refusal}))
""")


def test_registered_model_loads_without_cxr_and_matches_the_checkpoint(trained, mlflow_server, tmp_path):
    import keras

    from cxr.training import checkpoints

    run = trained["run"]
    best = int(run.data.metrics["best_epoch"])
    ckpts = sorted(c for c in (trained["base"] / "runs" / "life").glob("checkpoint_*") if c.is_dir())
    ckpt = next(c for c in ckpts if json.loads((c / checkpoints.STATE_FILE).read_text())["epoch"] == best)
    keras.mixed_precision.set_global_policy("float32")
    model = checkpoints.load_model(str(ckpt), "small_cnn", 64, 0.1)
    x = (np.random.default_rng(0).random((5, 64, 64, 1)) * 255).astype(np.uint8)
    np.save(tmp_path / "x.npy", x)
    expected = model.predict(x.astype(np.float32) / 255, verbose=0)
    env = quiet_env(MLFLOW_TRACKING_URI=mlflow_server)
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "x.npy"), str(tmp_path / "out.npz")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    got = np.load(tmp_path / "out.npz")
    for face in ("keras", "pyfunc", "frame"):
        np.testing.assert_allclose(got[face], expected, atol=1e-5, err_msg=face)
    assert info["columns"] == list(FINDINGS)
    assert "cxr model input: expected images of shape [N, 64, 64, 1]" in info["refusal"]


def test_resubmitting_a_finished_run_trains_and_logs_nothing(trained):
    client, rid = trained["client"], trained["run"].info.run_id
    before = len(client.get_metric_history(rid, "test_auroc_mean"))
    out = _cli(*trained["argv"], cwd=trained["base"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"run life already finished ({EPOCHS} epochs" in out.stdout and "nothing to train" in out.stdout

    other = _cli(*trained["argv"], "optim.lr=0.5", cwd=trained["base"])  # the same name, another config
    assert other.returncode == 2 and "run life already finished with another config (optim.lr: '0.001' → '0.5')" \
        in other.stderr, other.stderr[-2000:]
    moved = trained["base"] / "moved"  # the same name, other data: one shard's checksum differs in its manifest
    shutil.copytree(os.path.dirname(trained["manifest"]), moved)
    meta = json.loads((moved / "manifest.json").read_text())
    meta["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    (moved / "manifest.json").write_text(json.dumps(meta))
    argv = [a if not a.startswith("data.manifest_uri=") else f"data.manifest_uri={moved}/manifest.json"
            for a in trained["argv"]]
    changed = _cli(*argv, cwd=trained["base"])
    assert changed.returncode == 2 and "run life already finished on data with fingerprint" in changed.stderr \
        and "the data changed" in changed.stderr, changed.stderr[-2000:]
    assert len(client.get_metric_history(rid, "test_auroc_mean")) == before
    assert len(client.search_model_versions("name = 'lifecycle'")) == 1


def test_evaluate_reports_patient_level_intervals_and_logs_to_the_model_run(trained, mlflow_server):
    from cxr.data import manifest, reader

    out_dir = trained["base"] / "eval"
    out = _cli("evaluate", "--model", "models:/lifecycle/1", "--out", str(out_dir), "--resamples", "400",
               "--tracking-uri", mlflow_server, cwd=trained["base"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert {"report.json", "report.md", "roc.png", "pr.png", "reliability.png", "predictions.npz"} <= set(
        os.listdir(out_dir))
    rep = json.loads((out_dir / "report.json").read_text())
    patients = reader.split_patients(manifest.load(trained["manifest"]).shards("test"))
    assert rep["data"]["patients"] == len(set(patients.tolist())) and rep["data"]["images"] == len(patients)
    assert rep["data"]["fingerprint"] == _fingerprint(trained["manifest"]) and rep["auroc"]["unit"] == "patient"
    for name, a in rep["auroc"]["findings"].items():
        if a["auroc"] is not None:
            assert a["low"] <= a["auroc"] <= a["high"], name
        else:
            assert a["reason"], name
    assert rep["model"]["registered"] == {"name": "lifecycle", "version": "1"}
    text = (out_dir / "report.md").read_text()
    assert "Wang et al. 2017" in text and "random patient split (not comparable)" in text
    client, rid = trained["client"], trained["run"].info.run_id
    assert "evaluation/test/report.md" in {a.path for a in client.list_artifacts(rid, "evaluation/test")}
    metrics = client.get_run(rid).data.metrics  # training's test_auroc/* stays the one record; the interval joins it
    assert not [k for k in metrics if k.startswith("eval_test_auroc")], sorted(metrics)
    assert metrics["test_auroc_mean_ci_low"] == pytest.approx(rep["auroc"]["mean"]["low"])
    assert metrics["test_auroc_mean_ci_high"] == pytest.approx(rep["auroc"]["mean"]["high"])
    assert client.get_model_version("lifecycle", "1").tags["test_auroc_ci"].count("..") == 1

    ckpt = max(c for c in (trained["base"] / "runs" / "life").glob("checkpoint_*") if c.is_dir())  # folders too
    local = _cli("evaluate", "--model", str(ckpt), "--data", trained["manifest"], "--resamples", "200",
                 "--no-record", cwd=trained["base"])
    assert local.returncode == 0 and "mean" in local.stdout, local.stderr[-2000:]


# ------------------------------------------------------------------------------------------- promotion


def _variant(model, flip: list[int]):
    """A copy of `model` whose probabilities for the findings in `flip` are 1 - p (their AUROC becomes 1 - AUROC)."""
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    kernel, bias = clone.get_layer("logits").get_weights()
    kernel[:, flip], bias[flip] = -kernel[:, flip], -bias[flip]
    clone.get_layer("logits").set_weights([kernel, bias])
    return clone


def _register(uri: str, model, manifest_uri: str, fingerprint: str, learned=None) -> str:
    """A version of "duel" from a run of its own that names its data and the patients it learned from (those of
    the trained run it is a variant of), as a training run would."""
    import mlflow

    from cxr.tracking import provenance
    from cxr.tracking.models import log_model

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("cxr-duel")
    with mlflow.start_run(tags={"cxr.data": manifest_uri}) as run:
        if learned is not None:
            provenance.record(mlflow.MlflowClient(uri), run.info.run_id, learned.fingerprint, learned.train,
                              learned.val)
        info = log_model(model, name="duel", step=0, registered_model="duel", tags={"test_fingerprint": fingerprint})
    return str(info.registered_model_version)


def test_promotion_moves_the_champion_only_when_the_rules_say_so(trained, mlflow_server, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from cxr.tracking import promotion, provenance, registry

    mlflow.set_tracking_uri(mlflow_server)
    good = mlflow.keras.load_model("models:/lifecycle/1")
    server = MlflowServer(tmp_path).start()  # the registry under test, which goes down at the end
    uri, data, fp = server.url, trained["manifest"], _fingerprint(trained["manifest"])
    client = MlflowClient(uri)
    aurocs = json.loads((trained["base"] / "eval" / "report.json").read_text())["auroc"]["findings"]
    learned = provenance.learned_from(trained["client"], trained["run"].info.run_id)
    worse = _variant(good, list(range(len(FINDINGS))))  # every finding inverted: the mean falls well below 0.5
    v1 = _register(uri, worse, data, fp, learned)
    first = promotion.promote("duel", v1, tracking_uri=uri, resamples=300)
    assert first.promoted and registry.alias(client, "duel").version == v1

    v2 = _register(uri, good, data, fp, learned)  # better in the mean by far; max_drop off, only the mean decides here
    better = promotion.promote("duel", v2, tracking_uri=uri, resamples=300, max_drop=1.0)
    assert better.promoted, better.explain()
    assert registry.alias(client, "duel").version == v2 and registry.alias(client, "duel", "previous").version == v1
    tags = client.get_model_version("duel", v2).tags
    assert tags["cxr.decision"] == "promoted" and tags["cxr.decision.champion_version"] == v1
    assert float(tags["cxr.decision.ci_low"]) > 0 and tags["cxr.decision.fingerprint"] == fp

    v3 = _register(uri, good, data, fp, learned)  # the champion's twin: a difference of exactly 0 is no gain
    out = _cli("promote", "--model-name", "duel", "--candidate", v3, "--tracking-uri", uri, "--resamples", "300",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "decision: KEPT CHAMPION" in out.stdout and "is not above +0.0000" in out.stdout, out.stdout
    assert registry.alias(client, "duel").version == v2
    assert client.get_model_version("duel", v3).tags["cxr.decision"] == "kept champion"

    # Better on average, but one finding much worse: refused by max_drop.
    gains = [k for k, name in enumerate(FINDINGS) if (aurocs[name]["auroc"] or 0.5) < 0.5]
    strongest = max(range(len(FINDINGS)), key=lambda k: aurocs[FINDINGS[k]]["auroc"] or 0)
    v4 = _register(uri, _variant(good, [*gains, strongest]), data, fp, learned)
    traded = promotion.promote("duel", v4, tracking_uri=uri, resamples=300, min_gain=-1.0, max_drop=0.02)
    assert not traded.promoted and any(r.startswith(f"{FINDINGS[strongest]} drops by") for r in traded.reasons)
    assert registry.alias(client, "duel").version == v2

    v5 = _register(uri, good, data, "0" * 64, learned)  # evaluated on other data than the comparison would use
    with pytest.raises(promotion.PromotionError, match="was evaluated on data with fingerprint 0000000000000000"):
        promotion.promote("duel", v5, tracking_uri=uri, resamples=300)
    assert registry.alias(client, "duel").version == v2 and "cxr.decision" not in client.get_model_version(
        "duel", v5).tags

    server.stop()
    down = _cli("promote", "--model-name", "duel", "--candidate", v4, "--tracking-uri", uri, cwd=tmp_path,
                env=quiet_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5"), timeout=300)
    assert down.returncode != 0 and f"MLflow at {uri}" in down.stderr and "Traceback" not in down.stderr, down.stderr
    server.start()
    assert registry.alias(client, "duel").version == v2 and registry.alias(client, "duel", "previous").version == v1
    server.stop()


def test_a_failed_retrain_says_why_and_leaves_the_champion(trained, mlflow_server, tmp_path):
    from cxr.tracking import registry

    client = trained["client"]
    before = len(client.search_model_versions("name = 'lifecycle'"))
    client.set_registered_model_alias("lifecycle", "champion", "1")
    argv = [a if not a.startswith("data.manifest_uri=") else f"data.manifest_uri={tmp_path}/gone/manifest.json"
            for a in trained["argv"][3:]]  # the same run, but its data was never prepared
    out = _cli("retrain", "--config", os.path.join(ROOT, "configs", "demo.yaml"), "--slot", "2026-02-02", *argv,
               cwd=tmp_path)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("retrain 2026-02-02: failed (") and "manifest.json" in line, line
    assert line.endswith("the champion is unchanged")
    assert registry.alias(client, "lifecycle").version == "1"
    assert len(client.search_model_versions("name = 'lifecycle'")) == before
