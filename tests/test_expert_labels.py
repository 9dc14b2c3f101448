"""`cxr evaluate --labels FILE --label-map MAP`: expert labels replace the data's for the images they cover; and
the gaps of --predictions closed: options refused with --model, --dataset for a raw root, one read of the split."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

MAJKOWSKA = ("Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass")


@pytest.fixture(scope="module")
def phantoms(phantom_shards, tmp_path_factory) -> dict:
    """A predictions table of every test image of the phantoms (seeded probabilities, NIH's 14 columns) and a
    Majkowska-style label file covering every other test image and 7 validation images."""
    from cxr import config
    from cxr.evaluation import tables
    from cxr.labels import FINDINGS

    base = tmp_path_factory.mktemp("expert")
    images = tables.known(config.Data(manifest_uri=phantom_shards))
    names = np.array(images.names, dtype=object)
    test, val = np.flatnonzero(images.split == "test"), np.flatnonzero(images.split == "val")
    rng = np.random.default_rng(5)
    probs = rng.random((len(test), len(FINDINGS))).astype(np.float32)
    table = pd.DataFrame(probs.astype(np.float64), columns=list(FINDINGS))
    table.insert(0, "Image Index", names[test])
    table.to_csv(base / "preds.csv", index=False)
    covered = test[::2]  # the hand-selected subset: every other test image
    rows = np.concatenate([covered, val[:7]])
    labels = pd.DataFrame({"Image Index": names[rows], "Patient ID": images.patients[rows]})
    for j, finding in enumerate(MAJKOWSKA):
        labels[finding] = np.where(rng.random(len(rows)) < 0.3 + 0.1 * j, "YES", "NO")
    labels = labels.sample(frac=1.0, random_state=2).reset_index(drop=True)  # the file's order does not matter
    labels.to_csv(base / "expert.csv", index=False)
    return {"base": base, "data": phantom_shards, "images": images, "test": test, "covered": covered,
            "probs": probs, "labels": labels, "val_rows": 7}


def test_expert_labels_score_only_the_images_they_cover(phantoms):
    """The report covers the file's test images only, counts them right, and each finding's AUROC is
    scikit-learn's on that subset against the map's probabilities (max of Nodule, Mass; of Consolidation,
    Pneumonia, Infiltration); Fracture (no NIH output) is listed as not scored, with the map's reason."""
    from cxr.evaluation import report
    from cxr.evaluation.tables import evaluate_table
    from cxr.labels import FINDINGS

    base, images = phantoms["base"], phantoms["images"]
    out = base / "report"
    ev = evaluate_table(str(base / "preds.csv"), phantoms["data"], split="test", out=str(out), resamples=50,
                        subgroup_attributes=(), labels=str(base / "expert.csv"), label_map="nih-majkowska2019")
    rep = ev.report
    covered = phantoms["covered"]
    lab = rep["labels"]
    assert (lab["rows"], lab["scored"], lab["threshold_images"], lab["elsewhere"]) == (
        len(phantoms["labels"]), len(covered), 0, phantoms["val_rows"])
    assert rep["data"]["images"] == len(covered) and rep["data"]["outside_split"] == 0
    assert rep["data"]["patients"] == len(set(images.patients[covered].tolist()))
    assert list(rep["auroc"]["findings"]) == ["Pneumothorax", "Nodule or mass", "Airspace opacity"]  # the map's order
    assert rep["unscored"] == [{"finding": "Fracture", "side": "labels", "reason": "the label map says: NIH's 14 "
                                "findings have no fracture: a model trained on them has no output to score it"}]
    assert rep["anchors"] == [] and rep["findings"] == {}
    by_name = phantoms["labels"].set_index("Image Index")
    probs = phantoms["probs"][::2]  # the table's rows of the covered images, in the data's order
    col = {f: FINDINGS.index(f) for f in FINDINGS}
    expected = {"Pneumothorax": probs[:, col["Pneumothorax"]],
                "Nodule or mass": np.maximum(probs[:, col["Nodule"]], probs[:, col["Mass"]]),
                "Airspace opacity": probs[:, [col["Consolidation"], col["Pneumonia"], col["Infiltration"]]].max(1)}
    for finding, score in expected.items():
        truth = (by_name.loc[np.array(images.names, dtype=object)[covered], finding] == "YES").to_numpy()
        assert rep["auroc"]["findings"][finding]["auroc"] == pytest.approx(roc_auc_score(truth, score), abs=1e-12)
    md = (out / "report.md").read_text()
    assert "**Labels: `" in md and "expert.csv" in md and "built-in label map nih-majkowska2019" in md
    assert "Nodule or mass: column `Nodule or mass`, max of Nodule, Mass" in md
    assert "Fracture: column `Fracture`, not scored: NIH's 14 findings have no fracture" in md
    assert json.loads((out / "report.json").read_text())["labels"] == lab
    line = report.console(rep)
    assert f"{len(covered):,} images scored" in line and "Nodule or mass = max of Nodule/Mass" in line
    assert "not scored (the label map scores it by none): Fracture" in line


def test_a_combined_column_is_scored_by_the_max_of_its_findings(phantoms, tmp_path):
    """Six images by hand: 'Nodule or mass' scored by max(Nodule, Mass) has AUROC 7/9; Nodule alone would
    give 9/9, Mass alone 5/9, their mean 8/9. A map of the user's own: a numeric 1/0 column, one finding."""
    from cxr.evaluation.tables import evaluate_table
    from cxr.labels import FINDINGS

    names = np.array(phantoms["images"].names, dtype=object)[phantoms["test"][:6]]
    table = pd.DataFrame(0.5, index=range(6), columns=[f"prob_{f}" for f in FINDINGS])
    table["prob_Nodule"] = [0.9, 0.1, 0.2, 0.6, 0.3, 0.05]
    table["prob_Mass"] = [0.1, 0.8, 0.1, 0.2, 0.7, 0.1]
    table.insert(0, "path", [f"/scans/{n}" for n in names])
    table.to_csv(tmp_path / "six.csv", index=False)
    pd.DataFrame({"file": [f"x/{n}" for n in names], "nodmass": [1, 0, 0, 1, 1, 0]}).to_csv(tmp_path / "six-labels.csv",
                                                                                           index=False)
    (tmp_path / "map.yaml").write_text("name: mine\nimage: {column: file, regex: '([^/]+)$'}\n"
                                       "values: {'1': positive, '0': negative}\n"
                                       "findings:\n  Nodule or mass: {column: nodmass, scored_by: [nodule, Mass]}\n")
    rep = evaluate_table(str(tmp_path / "six.csv"), phantoms["data"], resamples=20, subgroup_attributes=(),
                         labels=str(tmp_path / "six-labels.csv"), label_map=str(tmp_path / "map.yaml")).report
    assert rep["auroc"]["findings"]["Nodule or mass"]["auroc"] == pytest.approx(7 / 9, abs=1e-12)
    assert rep["labels"]["findings"]["Nodule or mass"] == {"column": "nodmass", "scored_by": ["nodule", "Mass"],
                                                           "score": "max of", "reason": None}


def test_bad_label_files_and_maps_are_refused_naming_rows_columns_and_keys(phantoms, tmp_path):
    from cxr.data.spec import SpecError
    from cxr.evaluation.expert import LabelsError
    from cxr.evaluation.tables import TableError, evaluate_table

    base, good = phantoms["base"], phantoms["labels"]

    def refused(frame: pd.DataFrame | None, error: type, match: str, label_map: str = "nih-majkowska2019") -> None:
        if frame is not None:
            frame.to_csv(tmp_path / "bad.csv", index=False)
        with pytest.raises(error, match=match):
            evaluate_table(str(base / "preds.csv"), phantoms["data"], split="test", resamples=10,
                           subgroup_attributes=(), labels=str(tmp_path / "bad.csv"), label_map=label_map)

    maybe = good.copy()
    maybe.loc[2, "Nodule or mass"] = "MAYBE"
    maybe.loc[5, "Fracture"] = np.nan
    refused(maybe, LabelsError, r"2 cell\(s\) hold no value of built-in label map nih-majkowska2019 .*\('YES', 'NO'\): "
            r"row 3 column 'Nodule or mass': 'MAYBE'; row 6 column 'Fracture': ''")
    refused(good.drop(columns=["Airspace opacity"]), LabelsError,
            r"no column for findings.Airspace opacity.column 'Airspace opacity' of built-in label map")
    unknown = good.copy()
    unknown.loc[4, "Image Index"] = "missing_001.png"
    refused(unknown, TableError, r"1 of \d+ images are not in .*: row 5 'missing_001.png'")
    good.to_csv(tmp_path / "bad.csv", index=False)
    (tmp_path / "lesion.yaml").write_text("name: x\nimage: {column: Image Index}\nvalues: {'YES': positive}\n"
                                          "findings:\n  Nodule or mass: {scored_by: [Lung Lesion]}\n")
    refused(None, LabelsError, r"findings.Nodule or mass.scored_by 'Lung Lesion': not a finding of the predictions",
            str(tmp_path / "lesion.yaml"))
    (tmp_path / "typo.yaml").write_text("name: x\nimage: {column: Image Index}\nvalues: {YES: positive}\n"
                                        "findings:\n  Fracture: {scored-by: [Mass]}\n")
    refused(None, SpecError, r"typo.yaml: invalid label map:\n  values: YAML reads YES, NO.*unquoted as true/false"
            r"(.|\n)*findings.Fracture.scored-by: unknown key \(did you mean scored_by\?\)",
            str(tmp_path / "typo.yaml"))


def test_expert_labels_with_a_model_are_those_of_its_predictions_table(phantoms, tmp_path):
    """--model with --labels: the same report as the table of the model's own predictions with the same labels
    (thresholds from the file's validation images), and nothing recorded in the model's run."""
    from conftest import register_seeded_model
    from test_prediction_tables import _close

    from cxr.evaluation.evaluate import evaluate
    from cxr.evaluation.tables import evaluate_table

    uri, model, _ = register_seeded_model(tmp_path, "expert", 64, 0)
    kw = {"resamples": 50, "labels": str(phantoms["base"] / "expert.csv"), "label_map": "nih-majkowska2019"}
    ev = evaluate(model, phantoms["data"], tracking_uri=uri, **kw)
    val = evaluate(model, phantoms["data"], split="val", val_split=None, resamples=1, tracking_uri=uri,
                   record=False, subgroup_attributes=())
    test = evaluate(model, phantoms["data"], val_split=None, resamples=1, tracking_uri=uri, record=False,
                    subgroup_attributes=())
    images, findings = phantoms["images"], tuple(test.report["auroc"]["findings"])
    frames = []
    for split, e in (("test", test), ("val", val)):
        frame = pd.DataFrame(e.predictions.probs.astype(np.float64), columns=list(findings))
        frame.insert(0, "Image Index", np.array(images.names, dtype=object)[images.split == split])
        frames.append(frame)
    pd.concat(frames).to_csv(tmp_path / "own.csv", index=False)
    table = evaluate_table(str(tmp_path / "own.csv"), phantoms["data"], split="test", **kw).report
    rep = ev.report
    assert rep["labels"]["threshold_images"] == phantoms["val_rows"] and rep["data"]["threshold_split"] == "val"
    for key in ("auroc", "findings", "subgroups", "labels", "unscored"):
        _close(rep[key], table[key], key)
    import mlflow

    run = mlflow.MlflowClient(uri).get_run(ev.report["model"]["run_id"])
    assert not any(k.startswith("eval_") for k in run.data.metrics)


def test_against_and_image_column_are_refused_with_a_model(capsys):
    """They mean something only for a table: given with --model they were ignored; now exit 2 naming them."""
    from cxr.cli import main

    assert main(["evaluate", "--model", "/nowhere/ckpt", "--against", "theirs.csv", "--image-column", "x"]) == 2
    err = capsys.readouterr().err
    assert "--against and --image-column: only with --predictions" in err
    assert main(["evaluate", "--predictions", "p.csv", "--data", "d", "--labels", "e.csv"]) == 2
    assert "--labels FILE and --label-map MAP go together" in capsys.readouterr().err


def test_predictions_on_a_raw_root_of_another_layout_name_its_spec(tmp_path, capsys):
    """--dataset names how a raw root is read (as prepare and inspect do); without it the root is read as NIH's
    and refused."""
    import subprocess
    import sys

    from conftest import quiet_env

    from cxr import config
    from cxr.cli import main
    from cxr.evaluation import tables

    root = tmp_path / "hospital"
    subprocess.run([sys.executable, "-m", "cxr.cli", "synth", str(root), "--layout", "csv", "--patients", "30",
                    "--size", "32", "--seed", "1", "--workers", "1"], check=True, capture_output=True,
                   env=quiet_env(), timeout=300)
    images = tables.known(config.Data(source="raw", root=str(root), dataset="csv"))
    from cxr.data import roots

    findings = roots.findings("csv")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.random((len(images.names), len(findings))), columns=list(findings))
    frame.insert(0, "path", images.names)
    frame.to_csv(tmp_path / "p.csv", index=False)
    args = ["evaluate", "--predictions", str(tmp_path / "p.csv"), "--data", str(root), "--resamples", "20",
            "--subgroups", "none", "--out", str(tmp_path / "out")]
    assert main([*args, "--dataset", "csv"]) == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert tuple(rep["auroc"]["findings"]) == findings and rep["data"]["images"] == len(images.names)
    capsys.readouterr()
    assert main(args) == 2


def test_a_table_reads_each_shard_of_the_data_once(phantoms, monkeypatch):
    """The subgroups' sex / age / view come from the same read of the shards as the names, labels and patients."""
    from cxr.data import reader
    from cxr.evaluation.tables import evaluate_table

    fetched: list[str] = []
    fetch = reader.fetch_shard

    def counted(shard):
        fetched.append(shard.url)
        return fetch(shard)

    monkeypatch.setattr(reader, "fetch_shard", counted)
    rep = evaluate_table(str(phantoms["base"] / "preds.csv"), phantoms["data"], split="test", resamples=20).report
    assert rep["subgroups"]["attributes"].keys() == {"sex", "age", "view"}
    assert fetched and len(fetched) == len(set(fetched))
