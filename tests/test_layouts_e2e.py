"""Every published layout end to end in one process and one local Ray: synth --messy → inspect → prepare → train
one short epoch → evaluate, with the label set of the layout's spec all the way into MLflow and report.json; then
a fine-tune from a registered NIH-label model onto the CheXpert layout and external evaluations of that model on
the PadChest and CheXpert layouts (issue 21, §2, §4, §5)."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
from conftest import ROOT, register_seeded_model

from cxr import config as cfgmod
from cxr import labelmap, labels, synth
from cxr.data import manifest, spec, spec_summary
from cxr.data.prepare import prepare
from cxr.data.shards import Params
from cxr.evaluation.metrics import metric_name
from cxr.synth import layouts

pytestmark = pytest.mark.slow
LAYOUTS = ("chexpert", "mimic-cxr-jpg", "padchest", "csv")
SIZE = 32  # stored and trained: the smallest image the models take
PATIENTS = 40  # ~120 rows: every split gets images, the quirks a few rows each


def _overrides(tmp, name: str, manifest_uri: str, uri: str, *extra: str) -> list[str]:
    return [f"data.manifest_uri={manifest_uri}", f"data.image_size={SIZE}", "optim.epochs=1", "optim.batch_size=8",
            "optim.steps_per_epoch=3", "optim.steps_per_log=1000", "scaling.num_workers=1",
            f"run.storage_path={tmp}/runs", f"run.name={name}", f"tracking.tracking_uri={uri}",
            "tracking.experiment=e2e", f"tracking.run_name={name}", f"tracking.registered_model=e2e-{name}", *extra]


def _train(tmp, name: str, manifest_uri: str, uri: str, *extra: str) -> dict:
    from cxr import workflow

    cfg = cfgmod.with_absolute_paths(cfgmod.load(os.path.join(ROOT, "configs", "demo.yaml"),
                                                 _overrides(tmp, name, manifest_uri, uri, *extra)))
    return workflow.run(cfg)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Each layout synthesised, inspected, prepared and trained; one NIH-label model registered as champion."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("layouts")
    uri = f"sqlite:///{tmp}/mlflow.db"
    _, version_uri, _ = register_seeded_model(tmp, "e2e-nih", SIZE, seed=5, tracking_uri=uri)
    MlflowClient(uri).set_registered_model_alias("e2e-nih", "champion", version_uri.rsplit("/", 1)[1])
    out: dict = {"tmp": tmp, "uri": uri, "layouts": {}, "nih": "models:/e2e-nih@champion"}
    # one training per layout; the CheXpert one is the fine-tune of the NIH champion, the csv one counts uncertain
    # labels as positives
    extra = {"chexpert": (f"model.weights={out['nih']}",), "csv": ("data.uncertain=ones",)}
    for i, name in enumerate(LAYOUTS):
        root, shards = str(tmp / name), str(tmp / f"{name}-shards")
        synth.synthesize_layout(root, name, PATIENTS, size=SIZE, seed=11 + i, messy=True, workers=1, progress=False)
        with open(os.path.join(root, layouts.QUIRKS_FILE)) as fh:
            record = json.load(fh)
        inspected = spec_summary.inspect(name, root, scan_images=True)
        prepared = prepare(root, shards, Params(size=SIZE, images_per_shard=64), num_workers=1, dataset=name)
        trained = _train(tmp, name, prepared["manifest"], uri, *extra.get(name, ()))
        out["layouts"][name] = {"root": root, "record": record, "inspected": inspected, "prepared": prepared,
                                "manifest": prepared["manifest"], "trained": trained}
    return out


@pytest.mark.parametrize("name", LAYOUTS)
def test_inspect_counts_the_planted_quirks_and_prepare_excludes_them(world, name):
    lay = world["layouts"][name]
    record, s = lay["record"], lay["inspected"]
    for key, value in record["expected"].items():
        assert s[key] == value, key
    assert s["problem_counts"]["missing_image"] == record["quirks"]["missing_image"]
    assert s["problem_counts"]["view_filtered"] == record["quirks"]["lateral_view"]
    m = manifest.load(lay["manifest"])
    assert sum(m.images(split) for split in m.splits) == s["usable_rows"]
    assert lay["prepared"]["excluded_by_metadata"] == s["excluded_rows"]


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_label_set_flows_from_the_spec_to_mlflow_and_the_report(world, name, tmp_path):
    from mlflow.tracking import MlflowClient

    from cxr.evaluation.evaluate import evaluate
    from cxr.models import loading

    lay = world["layouts"][name]
    names = tuple(spec.load(name)[0].labels.names)
    m = manifest.load(lay["manifest"])
    assert m.findings == names and m.dataset_name == name
    trained = lay["trained"]
    assert tuple(k for k in trained["test"] if k != "mean") == names
    loaded = loading.load(trained["model_uri"], world["uri"])
    assert loaded.findings == names and loaded.model.output_shape[-1] == len(names)
    metrics = MlflowClient(world["uri"]).get_run(trained["mlflow_run_id"]).data.metrics
    logged = {k.rsplit("/", 1)[1] for k in metrics if k.startswith(("epoch/val_auroc/", "test_auroc/"))} - {"mean"}
    assert logged and logged <= {metric_name(n) for n in names}
    if "Pleural Effusion" in names:
        assert "epoch/val_auroc/Pleural Effusion" in metrics or "test_auroc/Pleural Effusion" in metrics

    # the split with uncertain labels: they are masked (-1), and the report's prevalence leaves them out
    split = max(m.splits, key=lambda s: (sum(m.uncertain_counts(s)), s == "test"))
    uncertain = np.array(m.uncertain_counts(split))
    ev = evaluate(trained["model_uri"], lay["manifest"], split=split, val_split="val", out=str(tmp_path),
                  resamples=20, tracking_uri=world["uri"], record=False)
    rep = json.loads((tmp_path / "report.json").read_text())
    assert tuple(rep["auroc"]["findings"]) == names == tuple(rep["findings"]) and rep["unscored"] == []
    _, y = ev.present()
    assert ((y < 0).sum(axis=0) == uncertain).all()  # every uncertain label of the split reaches scoring as -1
    if uncertain.sum():
        j = int(np.argmax(uncertain))
        known = y[:, j][y[:, j] >= 0]
        prevalence = rep["findings"][names[j]]["prevalence"]
        assert prevalence == pytest.approx(known.mean()) and len(known) < len(y)


def test_the_uncertain_policy_changes_the_labels_training_sees(world):
    from cxr.data import pipeline, source

    lay = world["layouts"]["csv"]
    m = manifest.load(lay["manifest"])
    uncertain = np.array(m.uncertain_counts("train"))
    assert uncertain.sum() > 0
    seen = {}
    for policy in ("ignore", "ones"):
        data = cfgmod.Data(manifest_uri=lay["manifest"], image_size=SIZE, uncertain=policy)
        ys = np.concatenate([batch[1].numpy() for batch in pipeline.make_dataset(
            lay["manifest"], "train", 16, image_size=SIZE, uncertain=policy)])
        seen[policy] = ys
        positives, _ = source.for_config(data).label_counts(data, "train")
        assert list((ys == 1).sum(axis=0)) == positives
    assert ((seen["ignore"] < 0).sum(axis=0) == uncertain).all() and not (seen["ones"] < 0).any()
    assert ((seen["ones"] == 1).sum(axis=0) == (seen["ignore"] == 1).sum(axis=0) + uncertain).all()
    tags = lay["trained"]  # the run was trained with data.uncertain=ones, and its MLflow params say so
    from mlflow.tracking import MlflowClient

    assert MlflowClient(world["uri"]).get_run(tags["mlflow_run_id"]).data.params["data.uncertain"] == "ones"


def test_fine_tuning_the_nih_champion_on_chexpert_keeps_its_backbone(world, caplog):
    import keras

    from cxr.models import build_model, loading
    from cxr.models.zoo import HEAD

    names = manifest.load(world["layouts"]["chexpert"]["manifest"]).findings
    nih = loading.load(world["nih"], world["uri"])
    caplog.set_level(logging.INFO, logger="cxr.models.weights")
    model = build_model("small_cnn", SIZE, 0.1, world["nih"], findings=names, tracking_uri=world["uri"])
    assert "the label sets differ (14 findings -> 14)" in caplog.text and "kept every layer below the head" in \
        caplog.text
    conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    for mine, theirs in zip(conv.get_weights(), nih.model.get_layer(conv.name).get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    shared = labelmap.shared(list(names), list(labels.FINDINGS))  # the head's columns carried over
    assert len(shared) == 7 and ("Pleural Effusion", "Effusion") in shared
    assert f"the head's {len(shared)} shared finding(s)" in caplog.text
    kernel, bias = model.get_layer(HEAD).get_weights()
    nih_kernel, nih_bias = nih.model.get_layer(HEAD).get_weights()
    for n, nih_name in shared:
        i, j = labels.FINDINGS.index(nih_name), names.index(n)
        np.testing.assert_array_equal(kernel[:, j], nih_kernel[:, i])
        assert bias[j] == nih_bias[i]

    # and as training resolved it: models:/NAME@champion through the run's tracking URI (the fixture's run)
    from mlflow.tracking import MlflowClient

    trained = world["layouts"]["chexpert"]["trained"]
    params = MlflowClient(world["uri"]).get_run(trained["mlflow_run_id"]).data.params
    assert params["model.weights"] == world["nih"] and trained["model_version"]
    assert tuple(k for k in trained["test"] if k != "mean") == names


@pytest.mark.parametrize(("name", "scored"), [("padchest", 14), ("chexpert", 7)])
def test_the_nih_model_is_validated_externally_on_the_shared_findings(world, name, scored, tmp_path):
    from cxr.evaluation.evaluate import evaluate

    lay = world["layouts"][name]
    data_names = manifest.load(lay["manifest"]).findings
    evaluate(world["nih"], lay["manifest"], out=str(tmp_path), resamples=20, tracking_uri=world["uri"], record=False)
    rep = json.loads((tmp_path / "report.json").read_text())
    pairs = labelmap.shared(labels.FINDINGS, data_names)
    assert len(pairs) == scored and len(rep["auroc"]["findings"]) == scored
    assert list(rep["auroc"]["findings"]) == [m for m, _ in pairs]
    assert rep["label_map"] == dict(pairs)
    unscored = {u["finding"] for u in rep["unscored"] if u["side"] == "model"}
    assert unscored == set(labels.FINDINGS) - {m for m, _ in pairs}
    assert all(u["reason"] for u in rep["unscored"])
    if name == "chexpert":
        assert rep["label_map"]["Effusion"] == "Pleural Effusion" and {"Hernia", "Emphysema"} <= unscored
