"""Promotion that data, splits and concurrency cannot fool, on real files, a real MLflow store and real processes.

One synthetic root without official split lists, grown by a third (root B has every patient, root A the first
two thirds): prepared again, its seeded patient split reshuffles, so a champion trained on A has seen some of
B's test patients. Models are seeded and untrained (promotion's rules, not training, are under test); each
records the patients it "trained" on through the same `cxr.tracking.provenance` a training run uses.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import MlflowServer, quiet_env

from cxr import config as cfgmod
from cxr.data import source as sources

pytestmark = pytest.mark.slow
SIZE = 64


def _subset(src, dst, patients: set[int] | None) -> str:
    """A copy of root `src` without its split lists, keeping the CSV rows of `patients` (all if None)."""
    dst.mkdir()
    os.symlink(src / "images", dst / "images")
    name = next(n for n in os.listdir(src) if n.startswith("Data_Entry"))
    with open(src / name) as fh, open(dst / name, "w", newline="") as out:
        rows = list(csv.reader(fh))
        writer = csv.writer(out)
        writer.writerow(rows[0])
        col = rows[0].index("Patient ID")
        writer.writerows(r for r in rows[1:] if patients is None or int(r[col]) in patients)
    return str(dst)


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("promotion")
    cli = [sys.executable, "-m", "cxr.cli"]
    subprocess.run([*cli, "synth", str(base / "synth"), "--patients", "150", "--size", str(SIZE), "--seed", "5"],
                   check=True, capture_output=True, env=quiet_env(), timeout=300)
    root_a = _subset(base / "synth", base / "a", set(range(1, 51)))
    root_b = _subset(base / "synth", base / "b", None)
    out = subprocess.run([*cli, "prepare", root_b, str(base / "shards"), "--size", str(SIZE),
                          "--images-per-shard", "100"], capture_output=True, text=True, env=quiet_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return {"base": base, "a": root_a, "b": root_b, "shards": str(base / "shards" / "manifest.json")}


def _raw(root: str, seed: int = 0) -> cfgmod.Data:
    return cfgmod.Data(source="raw", root=root, image_size=SIZE, split_seed=seed, allow_upsample=True)


def _shards(manifest: str) -> cfgmod.Data:
    return cfgmod.Data(source="shards", manifest_uri=manifest, image_size=SIZE, allow_upsample=True)


def _register(uri: str, name: str, seed: int, data: cfgmod.Data | None, learned: cfgmod.Data | None = None) -> str:
    """A seeded small_cnn version of `name` whose run is tagged as a training run on `data` tags it, having
    learned from the train and val patients of `learned` (default: `data`; none at all if both are None)."""
    import keras
    import mlflow

    from cxr.models import build_model
    from cxr.tracking import provenance
    from cxr.tracking.models import log_model
    from cxr.tracking.runs import artifact_location, experiment_id

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    mlflow.set_experiment(experiment_id=experiment_id(client, "cxr-promotion", artifact_location(uri)))
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(seed)
    learned = learned or data
    tags = {} if data is None else {**sources.data_tags(data), "cxr.data.fingerprint": sources.fingerprint(data)}
    with mlflow.start_run(tags=tags) as run:
        if learned is None:
            provenance.record(client, run.info.run_id, "", [], [])
        else:
            src = sources.for_config(learned)
            provenance.record(client, run.info.run_id, sources.fingerprint(learned),
                              src.patient_ids(learned, "train"), src.patient_ids(learned, "val"))
        info = log_model(build_model("small_cnn", SIZE), name="tiny", step=1, registered_model=name)
    return str(info.registered_model_version)


def test_the_champion_is_scored_only_on_patients_it_never_saw(roots, tmp_path):
    from mlflow.tracking import MlflowClient

    from cxr.tracking import promotion, registry

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    b = _shards(roots["shards"])
    v1 = _register(uri, "grown", 1, b, learned=_raw(roots["a"]))  # trained on root A before it grew
    first = promotion.promote("grown", v1, tracking_uri=uri, resamples=200)
    assert first.promoted and first.first and registry.alias(client, "grown").version == v1
    assert client.get_model_version("grown", v1).tags["cxr.decision.first"] == "true"
    v2 = _register(uri, "grown", 2, b)  # trained on root B as re-prepared

    seen_by_a = np.concatenate([sources.RAW.patient_ids(_raw(roots["a"]), s) for s in ("train", "val")])
    test_b = sources.SHARDS.patient_ids(b, "test")
    overlap = np.intersect1d(test_b, seen_by_a)
    assert 0 < overlap.size < test_b.size / 2, (overlap.size, test_b.size)  # the scenario under test

    with pytest.raises(promotion.PromotionError) as err:  # a floor the remaining patients cannot reach
        promotion.promote("grown", v2, tracking_uri=uri, resamples=200, min_unseen=0.99)
    fp_a, fp_b = sources.fingerprint(_raw(roots["a"])), sources.fingerprint(b)
    assert fp_a[:16] in str(err.value) and fp_b[:16] in str(err.value) and "below the floor of 99%" in str(err.value)
    assert "cxr.decision" not in client.get_model_version("grown", v2).tags

    decision = promotion.promote("grown", v2, tracking_uri=uri, resamples=200, min_gain=-1.0, max_drop=1.0)
    assert decision.patients == {"test": test_b.size, "excluded": overlap.size,
                                 "scored": test_b.size - overlap.size}, decision.explain()
    assert f"{overlap.size} excluded" in decision.explain()
    print(decision.explain())  # the figures a reader of the log wants
    tags = client.get_model_version("grown", v2).tags
    assert tags["cxr.decision.excluded_patients"] == str(overlap.size)
    assert tags["cxr.decision.champion_fingerprint"] == fp_a


def test_raw_models_with_other_split_settings_get_a_clear_error(roots, tmp_path):
    from cxr.tracking import promotion

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    v1 = _register(uri, "resplit", 1, _raw(roots["b"], seed=1))
    assert promotion.promote("resplit", v1, tracking_uri=uri, resamples=200).promoted
    v2 = _register(uri, "resplit", 2, _raw(roots["b"], seed=2))
    with pytest.raises(promotion.PromotionError, match="test patients") as err:
        promotion.promote("resplit", v2, tracking_uri=uri, resamples=200)
    assert "broadcast" not in str(err.value)


def test_promoting_the_champion_changes_nothing_and_no_tag_is_empty(roots, tmp_path):
    from mlflow.tracking import MlflowClient

    from cxr.tracking import promotion, registry

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    b = _shards(roots["shards"])
    v1 = _register(uri, "same", 1, b)
    floor = promotion.promote("same", v1, tracking_uri=uri, resamples=200, min_auroc=0.99)  # untrained: ~0.5
    assert not floor.promoted and floor.first and "below the floor 0.9900" in floor.reasons[0]
    assert registry.alias(client, "same") is None
    assert promotion.promote("same", v1, tracking_uri=uri, resamples=200).promoted
    v2 = _register(uri, "same", 2, b)
    assert promotion.promote("same", v2, tracking_uri=uri, resamples=200, min_gain=-1, max_drop=1).promoted
    before = client.get_model_version("same", v2).tags
    again = promotion.promote("same", v2, tracking_uri=uri, resamples=200)
    assert again.unchanged and "ALREADY CHAMPION" in again.explain()
    assert client.get_model_version("same", v2).tags == before
    assert registry.alias(client, "same").version == v2 and registry.alias(client, "same", "previous").version == v1
    for v in (v1, v2):
        assert all(value != "" for value in client.get_model_version("same", v).tags.values())


def _promote_cli(uri: str, name: str, version: str, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cxr.cli", "promote", "--model-name", name, "--candidate", version,
                             "--tracking-uri", uri, "--resamples", "200", "--min-gain", "-1", "--max-drop", "1"],
                            cwd=cwd, env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def concurrent_promotions(uri: str, roots: dict, cwd) -> dict:
    """Two better candidates promoted at the same time: each must be compared with the champion it replaces."""
    from mlflow.tracking import MlflowClient

    from cxr.tracking import promotion, registry

    client = MlflowClient(uri)
    b = _shards(roots["shards"])
    v1 = _register(uri, "race", 1, b)
    assert promotion.promote("race", v1, tracking_uri=uri, resamples=200).promoted
    v2, v3 = _register(uri, "race", 2, b), _register(uri, "race", 3, b)
    procs = [_promote_cli(uri, "race", v, cwd) for v in (v2, v3)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    champion, previous = registry.alias(client, "race"), registry.alias(client, "race", "previous")
    assert {champion.version, previous.version} == {v2, v3}, (champion, previous)
    tags = {v: client.get_model_version("race", v).tags for v in (v2, v3)}
    assert tags[champion.version]["cxr.decision.champion_version"] == previous.version
    assert tags[previous.version]["cxr.decision.champion_version"] == v1
    assert all(t["cxr.decision"] == "promoted" for t in tags.values())
    assert "race" + registry.LOCK_SUFFIX not in {m.name for m in client.search_registered_models()}
    stdout = "".join(o for o, _ in outs)
    return {"redecided": "while deciding; decided again against it" in stdout, "stdout": stdout}


def test_two_promotions_at_once_against_a_sqlite_backed_server(roots, tmp_path):
    server = MlflowServer(tmp_path).start()
    try:
        outcome = concurrent_promotions(server.url, roots, tmp_path)
    finally:
        server.stop()
    assert outcome["redecided"], outcome["stdout"]  # they overlapped: the second saw the first's move


def test_two_promotions_at_once_against_a_postgresql_backed_server(roots, mlflow_pg_server, tmp_path):
    outcome = concurrent_promotions(mlflow_pg_server, roots, tmp_path)
    assert outcome["redecided"], outcome["stdout"]


def test_every_model_uri_form_evaluates_on_the_split_and_sizes_it_was_trained_with(roots, tmp_path):
    """A raw-mode model trained with split seed 3 and images first sized to 96 px: a checkpoint folder, runs:/ and
    models:/ all score it on that seed's test patients, sized as it was (not seed 0, not 64 px)."""
    import keras
    import mlflow

    from cxr.data import raw
    from cxr.evaluation.evaluate import evaluate
    from cxr.models import build_model
    from cxr.training import checkpoints

    cfg = cfgmod.load(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"), [
        "data.source=raw", f"data.root={roots['b']}", "data.manifest_uri=null", f"data.image_size={SIZE}",
        "data.split_seed=3", "data.raw_size=96", "data.allow_upsample=true"])
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(4)
    build_model("small_cnn", SIZE, 0.1).save_weights(str(folder / checkpoints.MODEL_FILE))
    (folder / checkpoints.CONFIG_FILE).write_text(cfgmod.to_yaml(cfg))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    version = _register(uri, "sized", 4, cfg.data)
    run_id = mlflow.MlflowClient(uri).get_model_version("sized", version).run_id

    patients = raw.split_patients(roots["b"], "test", split_seed=3)
    assert not np.array_equal(np.unique(patients), np.unique(raw.split_patients(roots["b"], "test")))
    for model_uri in (str(folder), f"runs:/{run_id}/tiny", f"models:/sized/{version}"):
        rep = evaluate(model_uri, tracking_uri=uri, resamples=50, record=False, val_split=None).report
        assert rep["data"]["preprocessing"] == {"source": "raw", "image_size": SIZE, "raw_size": 96, "split_seed": 3,
                                                "val_fraction": 0.1, "test_fraction": 0.2,
                                                "uncertain": "ignore"}, model_uri
        assert (rep["data"]["images"], rep["data"]["patients"]) == (len(patients), len(set(patients))), model_uri


def test_saved_predictions_are_reused_only_under_the_same_model_data_split_and_sizes(roots, tmp_path, caplog):
    """A recorded `cxr evaluate` saves the test predictions in the model's run; scoring that model again on the same
    data, split and sizes (as a promotion does for its champion) takes them, with the same numbers, instead of
    predicting; another split, or a raw root split with another seed, is predicted afresh."""
    import logging

    from cxr.evaluation.evaluate import evaluate
    from cxr.tracking import promotion

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    v1 = _register(uri, "reuse", 7, _shards(roots["shards"]))
    model = f"models:/reuse/{v1}"
    fresh = evaluate(model, tracking_uri=uri, resamples=100, val_split=None)  # recorded: saves predictions.npz
    with caplog.at_level(logging.INFO, logger="cxr.evaluation"):
        again = evaluate(model, tracking_uri=uri, resamples=100, val_split=None, record=False, reuse=True)
        assert "reusing the predictions of test" in caplog.text
        np.testing.assert_array_equal(again.predictions.probs, fresh.predictions.probs)
        np.testing.assert_array_equal(again.patients, fresh.patients)
        assert again.report["auroc"] == fresh.report["auroc"]
        caplog.clear()
        evaluate(model, split="val", tracking_uri=uri, resamples=100, val_split=None, record=False, reuse=True)
        assert "reusing" not in caplog.text
        # A champion with saved predictions: the promotion predicts only the candidate.
        assert promotion.promote("reuse", v1, tracking_uri=uri, resamples=100).promoted
        v2 = _register(uri, "reuse", 8, _shards(roots["shards"]))
        caplog.clear()
        decision = promotion.promote("reuse", v2, tracking_uri=uri, resamples=100, min_gain=-1.0, max_drop=1.0)
        assert decision.promoted and caplog.text.count("reusing the predictions") == 1, caplog.text
        assert decision.scores["champion"] == pytest.approx(fresh.report["auroc"]["mean"]["auroc"], abs=1e-12)

    v3 = _register(uri, "reuse-raw", 9, _raw(roots["b"]))
    raw_model = f"models:/reuse-raw/{v3}"
    seed0 = evaluate(raw_model, tracking_uri=uri, resamples=100, val_split=None)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cxr.evaluation"):
        other = evaluate(raw_model, tracking_uri=uri, resamples=100, val_split=None, record=False, reuse=True,
                         split_tags={"cxr.split.seed": "4"})
    assert "for other settings" in caplog.text and "reusing" not in caplog.text
    assert not np.array_equal(np.unique(other.patients), np.unique(seed0.patients))
