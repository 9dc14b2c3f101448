"""`cxr evaluate --predictions`: a table of predictions made elsewhere is scored as the model that made it is."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import quiet_env, register_seeded_model


@pytest.fixture(scope="module")
def scored(phantom_shards, tmp_path_factory) -> dict:
    """A seeded model evaluated on the phantom test split (thresholds from val), and its val and test predictions
    written as a CSV table: shuffled, with `prob_` columns and paths under a folder the data never had."""
    from cxr import config
    from cxr.evaluation import tables
    from cxr.evaluation.evaluate import evaluate

    base = tmp_path_factory.mktemp("tables")
    uri, model, _ = register_seeded_model(base, "tables", 64, 0)
    ev = evaluate(model, phantom_shards, split="test", out=str(base / "model"), resamples=200, tracking_uri=uri,
                  record=False)
    val = evaluate(model, phantom_shards, split="val", val_split=None, resamples=1, tracking_uri=uri, record=False,
                   subgroup_attributes=())
    images = tables.known(config.Data(manifest_uri=phantom_shards))
    names = np.array(images.names, dtype=object)
    findings = tuple(ev.report["auroc"]["findings"])
    frames = []
    for split, e in (("test", ev), ("val", val)):
        assert e.predictions.seen.all()
        frame = pd.DataFrame(e.predictions.probs.astype(np.float64), columns=[f"prob_{f}" for f in findings])
        frame.insert(0, "path", [f"/elsewhere/scans/{n}" for n in names[images.split == split]])
        frames.append(frame)
    table = pd.concat(frames).sample(frac=1.0, random_state=1).reset_index(drop=True)
    table.to_csv(base / "preds.csv", index=False)
    return {"base": base, "uri": uri, "model": model, "ev": ev, "table": table, "findings": findings,
            "data": phantom_shards}


def _close(a, b, path: str = "") -> None:
    """Two JSON reports' values equal, numbers to 1e-9."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}/{i}")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-9), path
    else:
        assert a == b, path


def test_a_table_of_a_models_predictions_reports_what_the_model_does(scored):
    """The same AUROC CIs, operating points, calibration and subgroups to 1e-9, whatever the table's row order,
    and the files of `cxr evaluate --model`; without --split the table's rows are all scored."""
    from cxr.evaluation.tables import evaluate_table

    out = scored["base"] / "table"
    t = evaluate_table(str(scored["base"] / "preds.csv"), scored["data"], split="test", out=str(out),
                       resamples=200)
    rep, want = t.report, scored["ev"].report
    for key in ("auroc", "findings", "subgroups", "anchors"):
        _close(rep[key], want[key], key)
    assert rep["data"]["images"] == want["data"]["images"] and rep["data"]["patients"] == want["data"]["patients"]
    assert rep["data"]["threshold_split"] == "val" and rep["data"]["outside_split"] == 0
    assert rep["model"]["table"]["named_by"].startswith("prefix 'prob ' around the finding names (e.g. 'prob_")
    assert rep["model"]["table"]["image_column"] == "path"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (scored["base"] / "model").iterdir())
    assert json.loads((out / "report.json").read_text())["auroc"] == rep["auroc"]
    every = evaluate_table(str(scored["base"] / "preds.csv"), scored["data"], resamples=50, subgroup_attributes=())
    assert every.report["data"]["images"] == len(scored["table"]) and every.report["data"]["splits"].keys() == {
        "test", "val"} and every.report["findings"] == {}


def test_cxr_predicts_parquet_is_such_a_table(scored, tmp_path):
    """`cxr predict`'s layout (path, the findings, their yes/no columns, provenance) is read by its
    probability columns; the yes/no and text columns are not candidates."""
    from cxr.evaluation import tables

    t, findings = scored["table"], scored["findings"]
    frame = pd.DataFrame({"path": t["path"], **{f: t[f"prob_{f}"] for f in findings},
                          **{f"{f} positive": np.where(t[f"prob_{f}"] > 0.5, "yes", "no") for f in findings},
                          "model_uri": "models:/x/1", "model_version": "1"})
    frame.to_parquet(tmp_path / "p.parquet")
    read = tables.read(str(tmp_path / "p.parquet"), findings)
    assert read.affix == "the finding names" and read.columns == {f: f for f in findings}
    np.testing.assert_array_equal(read.probs, t[[f"prob_{f}" for f in findings]].to_numpy(np.float32))


def test_bad_tables_are_refused_naming_rows_and_columns(scored, tmp_path):
    from cxr.evaluation.tables import TableError, evaluate_table

    t, data = scored["table"], scored["data"]

    def refused(frame: pd.DataFrame, match: str) -> None:
        frame.to_csv(tmp_path / "bad.csv", index=False)
        with pytest.raises(TableError, match=match):
            evaluate_table(str(tmp_path / "bad.csv"), data, resamples=10)

    first = scored["findings"][0]
    unknown = t.copy()
    unknown.loc[[3, 7], "path"] = ["/x/nothing.png", "missing_001.png"]
    refused(unknown, r"2 of \d+ images are not in .*row 4 '/x/nothing.png'; row 8 'missing_001.png'")
    refused(t.drop(columns=[f"prob_{first}"]), rf"no probability column for 1 finding.*{first} \(column 'prob_{first}'")
    nan = t.copy()
    nan.loc[5, f"prob_{first}"] = np.nan
    third = f"prob_{scored['findings'][2]}"
    nan[third] = nan[third].astype(object)
    nan.loc[9, third] = "high"
    refused(nan, rf"2 cell\(s\).*row 6 column 'prob_{first}'.*row 10 column 'prob_{scored['findings'][2]}': 'high'")
    refused(pd.concat([t, t.iloc[[2]]]), rf"1 image\(s\) appear more than once: rows 3 and {len(t) + 1}")
    refused(t.rename(columns={"path": "file"}), "no image column")


def test_against_another_table_or_a_model_is_cxr_promotes_paired_comparison(scored, tmp_path):
    """--against: `cxr promote`'s paired patient bootstrap on the common images (this table - the other),
    through the command line; a table against itself differs by exactly 0."""
    from cxr.evaluation.bootstrap import paired_difference
    from cxr.evaluation.tables import evaluate_table

    t, findings, base = scored["table"], scored["findings"], scored["base"]
    rng = np.random.default_rng(0)
    other = t.iloc[: len(t) - 20].copy()  # 20 images it has no prediction for
    cols = [f"prob_{f}" for f in findings]
    other[cols] = np.clip(other[cols].to_numpy() + rng.normal(0, 0.2, (len(other), len(cols))), 0, 1)
    other = other.rename(columns=dict(zip(cols, findings, strict=True)))
    other.to_parquet(tmp_path / "other.parquet")
    out = tmp_path / "cmp"
    run = subprocess.run([sys.executable, "-m", "cxr.cli", "evaluate", "--predictions", str(base / "preds.csv"),
                          "--data", scored["data"], "--split", "test", "--against", str(tmp_path / "other.parquet"),
                          "--resamples", "100", "--subgroups", "none", "--out", str(out)],
                         capture_output=True, text=True, env=quiet_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    c = json.loads((out / "report.json").read_text())["comparison"]
    assert "against" in run.stdout and "## Comparison" in (out / "report.md").read_text()
    ev = evaluate_table(str(base / "preds.csv"), scored["data"], split="test", resamples=100,
                        subgroup_attributes=())
    probs, labels = ev.present()
    paths = _paths_in_order(scored)
    missing = set(t["path"].iloc[len(t) - 20:])
    keep = ~np.isin(paths, list(missing))
    assert c["images"] == keep.sum() and c["left_out"] == (~keep).sum() and c["images"] + c["left_out"] == len(paths)
    theirs = other.set_index("path").loc[paths[keep], list(findings)].to_numpy(np.float32)
    want = paired_difference(labels[keep], theirs, probs[keep], ev.patients[keep], resamples=100, names=findings)
    _close(c["mean"], want.to_dict()["mean"])
    same = evaluate_table(str(base / "preds.csv"), scored["data"], split="test", resamples=50,
                          subgroup_attributes=(), against=str(base / "preds.csv")).report["comparison"]
    assert same["mean"]["difference"] == 0.0 and same["left_out"] == 0
    model = evaluate_table(str(base / "preds.csv"), scored["data"], split="test", resamples=50,
                           subgroup_attributes=(), against=scored["model"],
                           tracking_uri=scored["uri"]).report["comparison"]  # the model that wrote the table
    assert model["images"] == len(paths) and model["mean"]["difference"] == 0.0
    assert all(f["difference"] in (0.0, None) for f in model["findings"].values())


def _paths_in_order(scored) -> np.ndarray:
    """The table's paths of the test images, in the report's (the data's) order."""
    from cxr import config
    from cxr.evaluation import tables

    images = tables.known(config.Data(manifest_uri=scored["data"]))
    return np.array([f"/elsewhere/scans/{n}" for n, s in zip(images.names, images.split, strict=True) if s == "test"],
                    dtype=object)
