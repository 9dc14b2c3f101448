"""What a run's reader sees: the plots draw the numbers the run produced, `cxr evaluate`'s report fits MLflow's
artifact viewer and says what each threshold reached, and a test AUROC is on a run's record once."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from conftest import register_seeded_model

from cxr.evaluation import figures, report
from cxr.labels import FINDINGS


def test_learning_curves_draw_losses_and_validation_mean_auroc():
    # history rows as the training loop writes them (train_loss, val_loss, val_auroc_mean, ...)
    history = [{"epoch": 1.0, "train_loss": 0.6, "val_loss": 0.5, "val_auroc_mean": 0.71, "val_auroc/Mass": 0.6,
                "val_auroc/Hernia": 0.8},
               {"epoch": 2.0, "train_loss": 0.4, "val_loss": 0.45, "val_auroc_mean": 0.83, "val_auroc/Mass": 0.7,
                "val_auroc/Hernia": 0.9}]
    fig = figures.learning_curves(history)
    loss, auroc, per_finding = fig.axes
    assert {line.get_label(): list(line.get_ydata()) for line in per_finding.get_lines()} == {
        "Hernia": [0.8, 0.9], "Mass": [0.6, 0.7]}
    drawn = {line.get_label(): list(line.get_ydata()) for line in loss.get_lines()}
    assert drawn == {"train_loss": [0.6, 0.4], "val_loss": [0.5, 0.45]}
    (curve,) = auroc.get_lines()
    np.testing.assert_array_equal(curve.get_xdata(), [1.0, 2.0])
    np.testing.assert_array_equal(curve.get_ydata(), [0.71, 0.83])


# ------------------------------------------------------------------ `cxr evaluate`'s report and its MLflow record

TRAINING = {"test_auroc_mean": 0.61, **{f"test_auroc/{name}": 0.6 for name in FINDINGS}}  # a stand-in


def _trained_elsewhere_or_here(base, name: str, manifest_uri: str, fingerprint: str) -> tuple[str, str, str]:
    """A registered model whose run names its data and holds the test AUROC its training logged (cxr train's keys,
    at the best epoch's step)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri, model, run_id = register_seeded_model(base, name, 64, 0, tags={"cxr.data": manifest_uri,
                                                                         "cxr.data.fingerprint": fingerprint})
    MlflowClient(uri).log_batch(run_id, metrics=[Metric(k, v, 0, 1) for k, v in TRAINING.items()])
    return uri, model, run_id


@pytest.fixture(scope="module")
def evaluated(phantom_shards, tmp_path_factory) -> dict:
    """`evaluate` recording into two models' runs: one trained on the evaluated data, one trained on other data."""
    from cxr.data import manifest
    from cxr.evaluation.evaluate import evaluate

    base = tmp_path_factory.mktemp("report")
    fingerprint = manifest.load(phantom_shards).fingerprint
    out = {"fingerprint": fingerprint, "base": base}
    for case, fp in (("here", fingerprint), ("elsewhere", "0" * 64)):
        uri, model, run_id = _trained_elsewhere_or_here(base, case, phantom_shards, fp)
        ev = evaluate(model, out=str(base / case), resamples=200, tracking_uri=uri)
        out[case] = {"uri": uri, "run_id": run_id, "report": ev.report, "dir": base / case}
    return out


def _history(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)]
            for k in client.get_run(run_id).data.metrics}


@pytest.mark.slow
def test_evaluating_the_training_data_again_adds_only_the_interval(evaluated):
    """The test AUROC training logged stays the run's one record of it (one chart group, `test_auroc`)."""
    from mlflow.tracking import MlflowClient

    here = evaluated["here"]
    history = _history(here["uri"], here["run_id"])
    mean = here["report"]["auroc"]["mean"]
    assert not [k for k in history if k.startswith("eval_test_auroc")], sorted(history)
    for key, value in TRAINING.items():
        assert history[key] == [(1, pytest.approx(value))], key  # not logged a second time
    assert history["test_auroc_mean_ci_low"] == [(0, pytest.approx(mean["low"]))]
    assert history["test_auroc_mean_ci_high"] == [(0, pytest.approx(mean["high"]))]
    run = MlflowClient(here["uri"]).get_run(here["run_id"])
    assert run.data.tags["cxr.evaluation.test.fingerprint"] == evaluated["fingerprint"]


@pytest.mark.slow
def test_evaluating_other_data_is_its_own_measurement(evaluated):
    """A model trained on other data: its training's test AUROC stays, and this evaluation sits beside it."""
    there = evaluated["elsewhere"]
    history = _history(there["uri"], there["run_id"])
    rep = there["report"]["auroc"]
    for key, value in TRAINING.items():
        assert history[key] == [(1, pytest.approx(value))], key
    for name, a in rep["findings"].items():
        assert history.get(f"eval_test_auroc/{name}") == (None if a["auroc"] is None else
                                                          [(0, pytest.approx(a["auroc"]))]), name
    for key, field in (("", "auroc"), ("_ci_low", "low"), ("_ci_high", "high")):
        assert history[f"eval_test_auroc_mean{key}"] == [(0, pytest.approx(rep["mean"][field]))]


def _tables(text: str) -> dict[str, list[list[str]]]:
    """Each Markdown table's body rows (cells stripped), keyed by the heading above it."""
    tables: dict[str, list[list[str]]] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("# ")
        elif line.startswith("|") and not line.startswith("|---"):
            tables.setdefault(heading, []).append([c.strip() for c in line.strip("|").split("|")])
    return {h: rows[1:] for h, rows in tables.items()}  # header row off


@pytest.mark.slow
def test_report_tables_fit_the_artifact_viewer_and_show_what_the_thresholds_reached(evaluated):
    from mlflow.tracking import MlflowClient

    here = evaluated["here"]
    text = (here["dir"] / "report.md").read_text()
    logged = MlflowClient(here["uri"]).download_artifacts(here["run_id"], "evaluation/test/report.md",
                                                          str(evaluated["base"] / "download"))
    assert open(logged).read() == text
    rep = here["report"]
    big = copy.deepcopy(rep)  # NIH-sized counts: five-digit true positives and positives
    for f in big["findings"].values():
        for point in (f["at_youden"], f["at_sensitivity"]):
            if point:
                point.update(tp=54321, fn=12345)
    for md in (text, report.markdown(big)):
        wide = [line for line in md.splitlines() if line.startswith("|") and len(line) > report.WIDTH]
        assert not wide, wide

    tables = _tables(text)
    for title, point_key, threshold_key in (("At the Youden threshold", "at_youden", "youden"),
                                            ("At the threshold for sensitivity 0.9", "at_sensitivity",
                                             "at_sensitivity")):
        assert [r[0] for r in tables[title]] == list(FINDINGS), title
        for name, threshold, sensitivity, specificity, *_ in tables[title]:
            f = rep["findings"][name]
            point = f[point_key]
            if point is None:
                assert (threshold, sensitivity, specificity) == ("–", "–", "–"), name
                continue
            assert threshold == f"{f['thresholds'][threshold_key]:.3f}", name
            reached = f"{point['sensitivity']:.3f} ({point['tp']}/{point['tp'] + point['fn']})"  # on test
            assert (sensitivity, specificity) == (reached, f"{point['specificity']:.3f}"), (title, name)
    assert [r[0] for r in tables["Discrimination"]] == [r[0] for r in tables["Calibration"]] == list(FINDINGS)
    assert [r[0] for r in tables["Published results"]] == [a["model"] for a in rep["anchors"]]


@pytest.mark.slow
def test_evaluate_reports_subgroups_of_the_split(evaluated, phantom_shards):
    """`cxr evaluate` by default: the phantoms' sex, age and view as the shards store them, each cell counted and
    scored on the patients it holds, one table per attribute in report.md, and subgroups.png."""
    from sklearn.metrics import roc_auc_score

    from cxr import config
    from cxr.data import source
    from cxr.evaluation import saved, subgroups

    here = evaluated["here"]
    rep, text = here["report"], (here["dir"] / "report.md").read_text()
    sub = rep["subgroups"]
    assert list(sub["attributes"]) == ["sex", "age", "view"] and sub["skipped"] == {}
    assert sub["resamples"] == rep["auroc"]["resamples"] == 200
    values = source.SHARDS.attributes(config.Data(manifest_uri=phantom_shards), "test")
    with np.load(here["dir"] / saved.FILE) as npz:  # the predictions the report scored, in its order
        probs, labels, index = npz["probs"], npz["labels"], npz["index"]
    values = {a: v[index] for a, v in values.items()}
    tables = _tables(text)
    for attribute, cells in sub["attributes"].items():
        assert sum(c["images"] for c in cells.values()) == rep["data"]["images"] == len(values[attribute])
        held = [c for c, cell in cells.items() if cell["images"]]  # empty cells: in the line above the table
        assert [r[1] for r in tables[attribute.capitalize()]][:len(held)] == held  # the "all" rows first
        assert len(tables[attribute.capitalize()]) == len(held) * (1 + len(rep["auroc"]["findings"]))
    sex = sub["attributes"]["sex"]
    assert set(sex) <= {"F", "M", "unknown"} and sex["F"]["images"] > 0 and sex["M"]["images"] > 0
    assert sex["F"]["images"] == int((values["sex"] == "F").sum())
    assert set(sub["attributes"]["view"]) == {*(v for v in values["view"] if v), "unknown"}
    scored = [(a, c, n, f) for a, cells in sub["attributes"].items() for c, cell in cells.items()
              for n, f in cell["findings"].items() if f["auroc"] is not None]
    assert scored, "no cell of the phantom test split scored a finding"
    for attribute, cell, name, f in scored[:5]:  # as sklearn scores the cell's images
        idx, names = subgroups.cells(attribute, values[attribute])
        k = list(rep["auroc"]["findings"]).index(name)
        inside = (idx == names.index(cell)) & (labels[:, k] >= 0)
        assert f["auroc"] == pytest.approx(roc_auc_score(labels[inside, k], probs[inside, k]), abs=1e-9)
        assert f["positives"] == int((labels[inside, k] > 0).sum())
    unscored = [f["reason"] for cells in sub["attributes"].values() for cell in cells.values()
                for f in cell["findings"].values() if f["auroc"] is None]
    assert all(unscored)  # every cell not scored says why
    assert "## Subgroups" in text and (here["dir"] / "subgroups.png").stat().st_size > 10_000
