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
import os
import time
from dataclasses import dataclass
from typing import Any

from cxr import storage
from cxr.redact import redact

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

    @property
    def images_per_second(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0


def predict(model_uri: str, spec: str, out: str, num_workers: int | None = None, batch_size: int = 32,
            tracking_uri: str | None = None, progress: bool = True) -> Summary:
    """Predict every image `spec` names with the model at `model_uri`; write `out` (.parquet or .csv)."""
    import pandas as pd
    from tqdm import tqdm

    from cxr.cluster import init_ray
    from cxr.inference import predict_files
    from cxr.models import loading

    if not out.endswith((".parquet", ".csv")):
        raise ValueError(f"--out {redact(out)}: the table is written as .parquet or .csv")
    paths = list_images(spec)
    loaded = loading.describe(model_uri, tracking_uri)  # fails here, once, if the URI is wrong
    provenance = {"model_uri": redact(model_uri),
                  "model_version": loaded.registered[1] if loaded.registered else "",
                  "training_fingerprint": loaded.tags.get("cxr.data.fingerprint", "")}
    init_ray()  # the run's time starts with a cluster to run on
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
    _write(table.drop(columns="index"), out)
    errors_out = None
    if errors:
        errors_out = out.rsplit(".", 1)[0] + ".errors.csv"
        _write(pd.DataFrame(errors).sort_values("index").drop(columns="index"), errors_out)
    return Summary(len(paths), len(rows), len(errors), seconds, out, errors_out)


def _write(frame: Any, url: str) -> None:
    """A table to a local path or any fsspec URL, by extension."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cxr-predict-") as tmp:
        local = os.path.join(tmp, os.path.basename(url))
        if url.endswith(".parquet"):
            frame.to_parquet(local, index=False)
        else:
            frame.to_csv(local, index=False)
        storage.upload(local, url)
