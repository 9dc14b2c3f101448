"""`cxr predict`: a model over a folder or bucket of studies (PNG, JPEG, DICOM), into one table.

The files are listed up front, then go through the model's replicas on the cluster (`cxr.inference`), read
and preprocessed exactly as training did. A file that cannot be read or decoded never stops the run: it becomes
an error row with its reason. The driver streams the batches back (a progress bar with img/s) and writes one
row per readable image, in input order, with the model's probabilities and where they came from (model URI
and version, the training data's fingerprint), plus `<out>.errors.csv` for the rest: readable rows + error
rows = input files.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr import storage
from cxr.redact import redact

log = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


def list_images(spec: str) -> list[str]:
    """The image files a spec names: a file, a folder (recursively), a local glob, or a URL prefix (s3://…)."""
    if "://" not in spec and any(ch in spec for ch in "*?["):
        found = sorted(glob.glob(spec, recursive=True))
    elif "://" in spec and not storage.is_local(spec):
        fs, path = storage.filesystem(spec)
        scheme = spec.split("://", 1)[0]
        found = sorted(f"{scheme}://{p}" for p in fs.find(path)) if fs.isdir(path) else [spec]
    elif os.path.isdir(storage.filesystem(spec)[1]):
        root = storage.filesystem(spec)[1]
        found = sorted(os.path.join(d, n) for d, _, files in os.walk(root) for n in files)
    else:
        found = [spec]
    if found == [spec] and not storage.exists(spec):  # before anything is loaded or started
        raise FileNotFoundError(f"no such file or folder: {redact(spec)}")
    images = [f for f in found if f.lower().endswith(EXTENSIONS) or len(found) == 1]
    if not images:
        raise FileNotFoundError(f"{redact(spec)}: no image files ({', '.join(EXTENSIONS)})")
    return images


@dataclass
class Summary:
    inputs: int
    predicted: int
    errors: int
    seconds: float
    out: str
    errors_out: str | None
    thresholds: str | None = None  # which thresholds the yes/no columns are at (None: no columns)
    warnings: tuple[str, ...] = ()

    @property
    def images_per_second(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0


def predict(model_uri: str, spec: str, out: str, num_workers: int | None = None, batch_size: int = 32,
            tracking_uri: str | None = None, progress: bool = True, operating_point: str = "sensitivity") -> Summary:
    """Predict every image `spec` names with the model at `model_uri`; write `out` (.parquet or .csv) with a
    yes/no column per finding at the thresholds its recorded evaluation chose on validation, when it has any."""
    import pandas as pd
    from tqdm import tqdm

    from cxr.evaluation.evaluate import stored_thresholds
    from cxr.inference import predict_files
    from cxr.models import loading

    if not out.endswith((".parquet", ".csv")):
        raise ValueError(f"--out {redact(out)}: the table is written as .parquet or .csv")
    paths = list_images(spec)
    loaded = loading.describe(model_uri, tracking_uri)  # fails here, once, if the URI is wrong
    provenance = {"model_uri": redact(model_uri),
                  "model_version": loaded.registered[1] if loaded.registered else "",
                  "training_fingerprint": loaded.tags.get("cxr.data.fingerprint", "")}
    chosen = stored_thresholds(loaded, tracking_uri, operating_point) if loaded.registered else None
    warnings = []
    if loaded.tags.get("cxr.data.synthetic") == "true":
        warnings.append("this model was trained on `cxr synth` phantoms, not radiographs: its probabilities on real "
                        "films mean nothing")
    if chosen is None:
        warnings.append("no yes/no columns: the model has no thresholds (run `cxr evaluate` on its registered "
                        "version to choose them on validation)")
    for text in warnings:
        log.warning("%s: %s", redact(model_uri), text)
    rows, errors = [], []
    t0 = time.perf_counter()
    with tqdm(total=len(paths), unit="img", desc="predict", disable=not progress) as bar:
        for batch in predict_files(model_uri, paths, loaded.image_size, tracking_uri, batch_size, num_workers):
            for index, path, error, probs in zip(batch["index"], batch["path"], batch["error"], batch["probs"],
                                                 strict=True):
                if error:
                    errors.append({"index": int(index), "path": redact(str(path)), "error": str(error)})
                else:
                    rows.append({"index": int(index), "path": redact(str(path)),
                                 **dict(zip(loaded.findings, map(float, probs), strict=True)), **provenance})
            bar.update(len(batch["index"]))
    seconds = time.perf_counter() - t0
    table = pd.DataFrame(rows, columns=["index", "path", *loaded.findings, *provenance]).sort_values("index")
    if chosen is not None:
        for f in loaded.findings:
            t = chosen.values.get(f)
            table.insert(table.columns.get_loc(loaded.findings[-1]) + 1 + loaded.findings.index(f), f"{f} positive",
                         "" if t is None else np.where(table[f] >= t, "yes", "no"))
    meta = {**provenance, "operating_point": chosen.point if chosen else None,
            "thresholds": chosen.values if chosen else {}, "threshold_source": chosen.source if chosen else None,
            "synthetic_training_data": loaded.tags.get("cxr.data.synthetic") == "true", "warnings": warnings}
    _write(table.drop(columns="index"), out, meta)
    errors_out = None
    if errors:
        errors_out = out.rsplit(".", 1)[0] + ".errors.csv"
        _write(pd.DataFrame(errors).sort_values("index").drop(columns="index"), errors_out)
    return Summary(len(paths), len(rows), len(errors), seconds, out, errors_out, chosen.source if chosen else None,
                   tuple(warnings))


def _write(frame: Any, url: str, meta: dict | None = None) -> None:
    """A table to a local path or any fsspec URL, by extension; `meta` into a Parquet's schema (key "cxr") and
    beside either as <stem>.meta.json. A CSV's probabilities are rounded to 4 places (a table for reading)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cxr-predict-") as tmp:
        local = os.path.join(tmp, os.path.basename(url))
        if url.endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            if meta is not None:
                table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                                       b"cxr": json.dumps(meta).encode()})
            pq.write_table(table, local)
        else:
            frame.to_csv(local, index=False, float_format="%.4f")
        storage.upload(local, url)
        if meta is not None:
            side = os.path.join(tmp, "meta.json")
            with open(side, "w") as fh:
                json.dump(meta, fh, indent=1)
            storage.upload(side, url.rsplit(".", 1)[0] + ".meta.json")
