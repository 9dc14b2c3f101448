"""`cxr evaluate`: one model on one split, reported as a radiologist would want to read it.

Per finding: AUROC with a 95% confidence interval from a bootstrap that resamples patients (an NIH patient has
up to ~180 images; resampling images would pretend they are independent), AUPRC, the thresholds chosen on the
validation split (Youden's J, and the one reaching sensitivity 0.9) with sensitivity, specificity, PPV, NPV
and F1 at them on the test split, and calibration (ECE and a reliability diagram); the mean AUROC with its
CI; findings that cannot be scored say why. Published anchors sit beside the table with the split they were
measured on, because a random split flatters a model (patients leak between train and test).

The model runs on the cluster's workers (`cxr.inference`: one pool for the test and validation splits);
this process only gathers the probabilities and computes the statistics.

Writes `report.json`, `report.md`, `roc.png`, `pr.png`, `reliability.png` and `predictions.npz` (what a
promotion compares, and may reuse: `cxr.evaluation.saved`) to `--out`; a model from MLflow also gets all
of it logged to its run, the metrics linked to its LoggedModel, and the summary tagged on its registered
version.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr import storage
from cxr.evaluation import figures, report, saved, subgroups
from cxr.evaluation.bootstrap import AurocCI, auroc_ci, patient_resamples
from cxr.evaluation.labelsets import SharedFindings, shared_findings
from cxr.evaluation.metrics import metric_name
from cxr.evaluation.operating import evaluate_operating
from cxr.inference import Predictions, predict_splits
from cxr.labels import FINDINGS
from cxr.redact import redact

log = logging.getLogger(__name__)
THRESHOLDS_TAG = "cxr.thresholds"  # a registered version's tag: its report whose validation thresholds predict applies

ANCHORS = (  # mean AUROC over the 14 findings as published, with the split each was measured on
    {"model": "Wang et al. 2017 (ResNet-50)", "split": "official NIH split", "mean_auroc": 0.745},
    {"model": "DenseNet-121, ImageNet initialisation", "split": "official NIH split", "mean_auroc": 0.81},
    {"model": "best published", "split": "official NIH split", "mean_auroc": 0.835},
    {"model": "CheXNet (Rajpurkar et al. 2017)", "split": "random patient split (not comparable)",
     "mean_auroc": 0.841},
)


@dataclass
class Evaluation:
    """The report (JSON-safe) and the per-image predictions behind it."""

    report: dict[str, Any]
    predictions: Predictions
    patients: np.ndarray  # patient id of each predicted image, in the order of `predictions.present()`
    ci: AurocCI
    out: str | None
    mapping: SharedFindings | None = None  # model outputs ↔ data labels (identity for the same label set)
    key: saved.Key | None = None  # what its saved predictions depend on (None: not reusable)

    def present(self) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, labels) of the scored findings for the predicted images, as the report has them."""
        probs, labels = self.predictions.present()
        return self.mapping.take(probs, labels) if self.mapping is not None else (probs, labels)


def evaluate(model_uri: str, data_uri: str | None = None, split: str = "test", val_split: str | None = "val",
             out: str | None = None, resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
             batch_size: int = 64, tracking_uri: str | None = None, record: bool = True,
             split_tags: dict[str, str] | None = None, reuse: bool = False, subgroup_attributes: str | tuple = "auto",
             age_bands: tuple[int, ...] = subgroups.AGE_BANDS) -> Evaluation:
    """Evaluate the model at `model_uri` on `split` of `data_uri` (default: the data it was trained on).

    A raw root is split as the model's run split it, or as `split_tags` say (a promotion scores both models on
    the candidate's split); images are preprocessed as the model's were. `val_split=None` skips the operating
    points (their thresholds need the validation split predicted too). `reuse`: take the predictions saved in
    the model's run when they were made under exactly these settings (`cxr.evaluation.saved`).
    `subgroup_attributes`: "auto" (sex, age, view where the data has them), () for none, or some of them."""
    from cxr.data import source as sources
    from cxr.models import loading

    subgroup_attributes = subgroups.parse_attributes(subgroup_attributes)  # a typo fails before any prediction
    age_bands = subgroups.parse_bands(age_bands)
    loaded = loading.describe(model_uri, tracking_uri)
    data_uri = data_uri or loaded.tags.get("cxr.data")
    if not data_uri:
        raise ValueError(f"{redact(model_uri)}: no --data given and the model's run does not name its data")
    data = sources.data_config(data_uri, loaded.image_size, loaded.tags, split_tags)
    source = sources.for_config(data)
    log.debug("evaluating %s on %s of %s", redact(model_uri), split, redact(data_uri))
    mapping = shared_findings(loaded.findings, sources.findings(data))
    fingerprint = sources.fingerprint(data)
    wanted = [split] + ([val_split] if val_split is not None and val_split != split else [])
    preds: dict[str, Predictions] = {}
    if reuse and mapping.identity:
        for s in wanted:
            key = saved_key(loaded, data, s, fingerprint, source)
            found = saved.find(tracking_uri, loaded.run_id, key) if key is not None else None
            if found is not None:
                log.info("%s: reusing the predictions of %s saved in its run", redact(model_uri), s)
                preds[s] = found
    todo = [s for s in wanted if s not in preds]
    if todo:
        preds.update(predict_splits(loaded.pinned, data, todo, outputs=len(loaded.findings), batch_size=batch_size,
                                    tracking_uri=tracking_uri))
    test = preds[split]
    patients = source.patients(data, split)[test.seen]
    probs, labels = mapping.take(*test.present())
    names = mapping.names

    def attributes() -> dict[str, np.ndarray] | None:
        return None if source.attributes is None else {a: np.asarray(v)[test.seen]
                                                       for a, v in source.attributes(data, split).items()}

    val = None if val_split is None else mapping.take(*preds[val_split].present())
    ci, stats = statistics(probs, labels, patients, names, attributes, f"the {split} split", val, resamples,
                           confidence, seed, subgroup_attributes, age_bands)
    summary = {
        "model": {"uri": redact(model_uri), "run_id": loaded.run_id,
                  "registered": None if loaded.registered is None else
                  {"name": loaded.registered[0], "version": loaded.registered[1]}},
        "data": {"uri": redact(data_uri), "fingerprint": fingerprint, "split": split,
                 "threshold_split": val_split, "images": int(test.seen.sum()), "patients": int(len(set(patients))),
                 "unreadable_images": test.missing, "preprocessing": preprocessing(data)},
        **stats,
        "label_map": mapping.describe(),
        "unscored": mapping.unscored,
        "anchors": list(ANCHORS) if names == FINDINGS else [],  # the published means are over NIH's 14
    }
    if "subgroups" in stats:  # after the anchors, where report.json always had it
        summary["subgroups"] = summary.pop("subgroups")
    if mapping.unscored:
        log.warning("findings not scored: %s", "; ".join(f"{u['finding']} ({u['reason']})" for u in mapping.unscored))
    evaluation = Evaluation(summary, test, patients, ci, out, mapping, saved_key(loaded, data, split, fingerprint,
                                                                            source) if mapping.identity else None)
    if out:
        write(evaluation, out)
    if record and loaded.run_id:
        _record(evaluation, loaded, tracking_uri)
    return evaluation


def statistics(probs: np.ndarray, labels: np.ndarray, patients: np.ndarray, names: tuple[str, ...],
               attributes: Callable[[], dict[str, np.ndarray] | None], where: str,
               val: tuple[np.ndarray, np.ndarray] | None, resamples: int, confidence: float, seed: int,
               subgroup_attributes: str | tuple, age_bands: tuple[int, ...]) -> tuple[AurocCI, dict[str, Any]]:
    """The report's statistics of scored predictions, whoever made them (a model here, a table in
    `cxr.evaluation.tables`): AUROC CIs, operating points with thresholds from `val` (probabilities, labels),
    and the subgroups of `attributes()` (each scored image's sex / age / view; None: the data records none)."""
    draws = patient_resamples(patients, resamples, seed)  # one draw: the subgroups' gaps pair with the overall CI
    ci = auroc_ci(labels, probs, patients, resamples=resamples, confidence=confidence, seed=seed, names=names,
                  draws=draws)
    groups = None
    if subgroups.parse_attributes(subgroup_attributes):
        groups = subgroups.for_values(attributes(), where, labels, probs, draws, ci, subgroup_attributes, age_bands)
    ops = [] if val is None else evaluate_operating(val[1], val[0], labels, probs, names=names)
    stats: dict[str, Any] = {"auroc": ci.to_dict(), "findings": {f.finding: f.to_dict() for f in ops}}
    if groups is not None:
        stats["subgroups"] = groups
    return ci, stats


def preprocessing(data: Any) -> dict[str, Any]:
    """How the images were split, sized and labelled for this evaluation: what makes it reproducible."""
    if data.source == "shards":
        return {"source": "shards", "image_size": data.image_size, "uncertain": data.uncertain}
    return {"source": "raw", "image_size": data.image_size, "raw_size": data.raw_size or data.image_size,
            "split_seed": data.split_seed, "val_fraction": data.val_fraction, "test_fraction": data.test_fraction,
            "uncertain": data.uncertain}


def saved_key(loaded: Any, data: Any, split: str, fingerprint: str, source: Any) -> saved.Key | None:
    """What predictions of `loaded` on `split` of `data` depend on; None for a model without a LoggedModel id."""
    if not loaded.model_id:
        return None
    return saved.Key(loaded.model_id, fingerprint, split, int(source.split_size(data, split)), tuple(loaded.findings),
                     preprocessing(data))


def write(evaluation: Evaluation, out: str) -> None:
    """report.json, report.md, the figures and the predictions, into a local folder or any fsspec URL."""
    rep = evaluation.report
    probs, labels = evaluation.present()
    names = tuple(rep["auroc"]["findings"])  # the scored findings, by the model's names
    split = rep["data"]["split"]
    with tempfile.TemporaryDirectory(prefix="cxr-eval-") as local:
        with open(os.path.join(local, "report.json"), "w") as fh:
            json.dump(rep, fh, indent=1)
        with open(os.path.join(local, "report.md"), "w") as fh:
            fh.write(report.markdown(rep))
        title = f"{rep['model']['uri']} on {split}"
        figures.roc_grid_ci(labels, probs, evaluation.ci, f"{title}: ROC", rep["findings"]).savefig(
            os.path.join(local, "roc.png"))
        figures.pr_grid(labels, probs, f"{title}: precision-recall", names).savefig(os.path.join(local, "pr.png"))
        figures.reliability_grid(labels, probs, f"{title}: calibration", names=names).savefig(
            os.path.join(local, "reliability.png"))
        if rep.get("subgroups", {}).get("attributes"):
            figures.subgroup_grid(rep, f"{title}: AUROC by subgroup").savefig(os.path.join(local, "subgroups.png"))
        saved.write(os.path.join(local, saved.FILE), probs, labels, evaluation.patients,
                    np.flatnonzero(evaluation.predictions.seen), rep["data"]["fingerprint"], evaluation.key)
        for name in sorted(os.listdir(local)):
            storage.upload(os.path.join(local, name), storage.join(out, name))


def _record(evaluation: Evaluation, loaded: Any, tracking_uri: str | None) -> None:
    """Everything into the model's MLflow run under evaluation/<split>/, metrics linked to its LoggedModel."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    rep = evaluation.report
    split = rep["data"]["split"]
    client = MlflowClient(tracking_uri)
    model_id = loaded.model_id
    now = int(time.time() * 1000)
    # Training already logged this split of this data into the run (`test_auroc/*`): only the interval is new.
    # Other data is another measurement and gets a chart group of its own, eval_<split>_auroc.
    run = client.get_run(loaded.run_id)
    on_record = (run.data.tags.get("cxr.data.fingerprint") == rep["data"]["fingerprint"]
                 and f"{split}_auroc_mean" in run.data.metrics)
    prefix, mean = (split if on_record else f"eval_{split}"), rep["auroc"]["mean"]
    metrics = {f"{prefix}_auroc_mean_ci_low": mean["low"], f"{prefix}_auroc_mean_ci_high": mean["high"]}
    if not on_record:
        metrics.update({f"{prefix}_auroc/{metric_name(name)}": v["auroc"]
                        for name, v in rep["auroc"]["findings"].items()})
        metrics[f"{prefix}_auroc_mean"] = mean["auroc"]
    client.log_batch(loaded.run_id, metrics=[Metric(k, float(v), now, 0, model_id=model_id)
                                             for k, v in metrics.items() if v is not None])
    client.set_tag(loaded.run_id, f"cxr.evaluation.{split}.fingerprint", rep["data"]["fingerprint"])
    with tempfile.TemporaryDirectory(prefix="cxr-eval-") as local:
        write(evaluation, local)
        client.log_artifacts(loaded.run_id, local, artifact_path=f"evaluation/{split}")
    if loaded.registered is not None:
        name, version = loaded.registered
        mean = rep["auroc"]["mean"]
        tags = {f"{split}_auroc_mean": mean["auroc"], f"{split}_auroc_ci": f"{mean['low']}..{mean['high']}",
                f"{split}_fingerprint": rep["data"]["fingerprint"]}
        if rep["findings"]:  # thresholds were chosen on validation: `cxr predict` applies them
            tags[THRESHOLDS_TAG] = f"evaluation/{split}/report.json"
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, str(value))


@dataclass(frozen=True)
class StoredThresholds:
    """A registered version's per-finding thresholds from its latest recorded evaluation, and what they are."""

    values: dict[str, float | None]  # None: validation could not choose one (no positive, say)
    point: str  # "sensitivity" or "youden"
    source: str  # one line for people: which operating point, chosen on what


def stored_thresholds(loaded: Any, tracking_uri: str | None, point: str = "sensitivity") -> StoredThresholds | None:
    """The thresholds `cxr evaluate` recorded for this registered version (None if it never chose any)."""
    import mlflow

    where = loaded.version_tags.get(THRESHOLDS_TAG)
    if not where or not loaded.run_id:
        return None
    with tempfile.TemporaryDirectory(prefix="cxr-thresholds-") as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=loaded.run_id, artifact_path=where, dst_path=tmp,
                                                   tracking_uri=tracking_uri)
        with open(path) as fh:
            rep = json.load(fh)
    chosen = {f: v["thresholds"] for f, v in rep["findings"].items()}
    key = "at_sensitivity" if point == "sensitivity" else "youden"
    target = next(iter(chosen.values()))["sensitivity_target"]
    what = f"sensitivity {target:g}" if point == "sensitivity" else "Youden's J"
    name, version = loaded.registered
    return StoredThresholds({f: t[key] for f, t in chosen.items()}, point,
                            f"thresholds at {what} on the {rep['data']['threshold_split']} split, from the recorded "
                            f"`cxr evaluate` of {name} version {version} (data {rep['data']['fingerprint'][:12]})")
