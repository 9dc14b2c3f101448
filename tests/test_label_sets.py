"""Label sets beyond NIH's 14 (issue 21 §2, §4): masked BCE, masked metrics, heads sized by the data, fine-tuning."""

from __future__ import annotations

import json
import math
import os

import keras
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxr.evaluation.bootstrap import auroc_ci, paired_difference
from cxr.evaluation.metrics import auroc_metrics, auroc_per_finding
from cxr.evaluation.operating import evaluate_operating
from cxr.losses import binary_crossentropy
from cxr.models import build_model
from cxr.models.weights import fine_tune

CHEX = ("No Finding", "Cardiomegaly", "Pleural Effusion", "Support Devices")


def test_masked_bce_matches_a_hand_computed_case() -> None:
    y = np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]], np.float32)
    p = np.array([[0.8, 0.3, 0.4], [0.1, 0.9, 0.99]], np.float32)
    got = np.asarray(binary_crossentropy()(y, p))
    # row 0: -ln 0.8 (positive) + nothing (uncertain, masked) - ln 0.6 (negative), over K = 3
    # row 1: -ln 0.9 (negative) - ln 0.9 (positive) + nothing
    want = [(-math.log(0.8) - math.log(0.6)) / 3, (-2 * math.log(0.9)) / 3]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    bp, bn = np.array([2.0, 3.0, 4.0], np.float32), np.array([1.5, 1.2, 1.1], np.float32)
    weighted = np.asarray(binary_crossentropy(bp, bn)(y, p))
    np.testing.assert_allclose(weighted, [(-2 * math.log(0.8) - 1.1 * math.log(0.6)) / 3,
                                          (-1.5 * math.log(0.9) - 3 * math.log(0.9)) / 3], rtol=1e-6)
    # An uncertain label of a confident wrong prediction adds nothing: the same as the label being absent.
    y2 = y.copy()
    y2[0, 1] = 1.0
    assert np.asarray(binary_crossentropy()(y2, p))[0] > got[0]


def test_metrics_leave_unknown_labels_out_per_finding() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (300, 3)).astype(np.float32)
    s = np.clip(y * 0.3 + rng.random((300, 3)) * 0.7, 0, 1)
    y[rng.random((300, 3)) < 0.25] = -1.0
    got = auroc_per_finding(y, s)
    for k in range(3):
        keep = y[:, k] >= 0
        assert got[k] == pytest.approx(roc_auc_score(y[keep, k], s[keep, k]), abs=1e-12)
    metrics = auroc_metrics(y, s, "val", ("a", "b (left)", "c"))
    assert set(metrics) == {"val_auroc_mean", "val_auroc/a", "val_auroc/b _left_", "val_auroc/c"}
    patients = np.arange(300) // 3
    ci = auroc_ci(y, s, patients, resamples=200, seed=1, names=("a", "b", "c"))
    assert [f.auroc for f in ci.findings] == pytest.approx(list(got), abs=1e-12)
    assert all(f.low < f.auroc < f.high for f in ci.findings)
    same = paired_difference(y, s, s, patients, resamples=50, seed=1)
    assert same.difference == 0.0
    ops = evaluate_operating(y, s, y, s, names=("a", "b", "c"))
    for k, op in enumerate(ops):
        known = y[:, k][y[:, k] >= 0]
        assert op.prevalence == pytest.approx(known.mean())
        assert op.at_youden.tp + op.at_youden.fn == int(known.sum())


def test_a_finding_whose_other_labels_are_all_uncertain_is_undefined_and_says_so() -> None:
    y = np.array([[1, 1], [-1, 0], [-1, 1], [1, 0]], np.float32)
    s = np.array([[0.9, 0.2], [0.1, 0.1], [0.2, 0.8], [0.7, 0.3]], np.float32)
    ci = auroc_ci(y, s, np.arange(4), resamples=20, names=("x", "y"))
    assert ci.findings[0].auroc is None and "uncertain" in ci.findings[0].reason
    assert ci.findings[1].auroc == 0.75  # positives 0.2, 0.8 against negatives 0.1, 0.3: 3 of 4 pairs


def test_the_head_is_sized_by_the_label_set_and_fine_tuning_keeps_shared_findings(tmp_path) -> None:
    keras.utils.set_random_seed(0)
    nih = build_model("small_cnn", 32)
    chex = build_model("small_cnn", 32, findings=CHEX)
    assert nih.output_shape[-1] == 14 and chex.output_shape[-1] == 4
    names = ("Atelectasis", "Cardiomegaly", "Effusion")
    fine_tune(nih, tuple(f"x{i}" for i in range(11)) + names, chex, CHEX, "test")
    src_k, src_b = nih.get_layer("logits").get_weights()
    k, b = chex.get_layer("logits").get_weights()
    np.testing.assert_array_equal(k[:, 1], src_k[:, 12])  # Cardiomegaly: the same name, its column carried over
    np.testing.assert_array_equal(k[:, 2], src_k[:, 13])  # Pleural Effusion = NIH Effusion (cxr/labelmap.yaml)
    assert b[2] == src_b[13]
    assert not np.array_equal(k[:, 0], src_k[:, 0])  # No Finding: a new output
    np.testing.assert_array_equal(chex.get_layer("conv0").get_weights()[0], nih.get_layer("conv0").get_weights()[0])
    with pytest.raises(ValueError, match="does not fit"):
        fine_tune(build_model("small_cnn", 64), CHEX, build_model("mobilenet_v2", 32), CHEX, "test")


def test_a_logged_model_carries_its_label_set(tmp_path) -> None:
    import mlflow

    from cxr.models import loading
    from cxr.tracking import models
    from cxr.tracking.runs import artifact_location, experiment_id

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)  # artifacts beside the store, not in ./mlruns of the checkout
    mlflow.set_experiment(experiment_id=experiment_id(mlflow.MlflowClient(uri), "labels", artifact_location(uri)))
    keras.utils.set_random_seed(0)
    model = build_model("small_cnn", 32, findings=CHEX)
    with mlflow.start_run():
        info = models.log_model(model, name="chex", step=1, registered_model="chex", findings=CHEX)
        with pytest.raises(ValueError, match="4 outputs"):
            models.log_model(model, name="bad", step=1)
    loaded = loading.load(f"models:/chex/{info.registered_model_version}", uri)
    assert loaded.findings == CHEX
    local = mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=str(tmp_path / "m"))
    assert tuple(mlflow.models.get_model_info(info.model_uri).signature.outputs.input_names()) == CHEX
    with open(os.path.join(local, "data", "findings.json")) as fh:
        assert tuple(json.load(fh)) == CHEX
    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    table = pyfunc.predict(np.zeros((2, 32, 32, 1), np.uint8))
    assert tuple(table.columns) == CHEX


def test_an_nih_model_on_chexpert_labels_scores_the_shared_findings_and_lists_the_rest() -> None:
    from cxr.evaluation.labelsets import shared_findings
    from cxr.labels import FINDINGS

    chex = ("No Finding", "Lung Lesion", "Cardiomegaly", "Pleural Effusion", "Edema")
    plan = shared_findings(FINDINGS, chex)
    assert plan.names == ("Cardiomegaly", "Effusion", "Edema")
    assert plan.data_names == ("Cardiomegaly", "Pleural Effusion", "Edema")
    unscored = {(u["side"], u["finding"]): u["reason"] for u in plan.unscored}
    assert "Lung Lesion" in unscored[("model", "Mass")] and "no equivalent" in unscored[("data", "No Finding")]
    assert len(unscored) == 11 + 2
    probs = np.arange(2 * 14, dtype=np.float32).reshape(2, 14)
    labels = np.array([[0, 1, 1, 0, -1], [1, 0, 0, 1, 1]], np.float32)
    p, y = plan.take(probs, labels)
    np.testing.assert_array_equal(p, probs[:, [1, 2, 9]])
    np.testing.assert_array_equal(y, labels[:, [2, 3, 4]])
    same = shared_findings(FINDINGS, FINDINGS)
    assert same.identity and same.describe() is None
    with pytest.raises(ValueError, match="share none"):
        shared_findings(("Fracture",), ("Support Devices",))
