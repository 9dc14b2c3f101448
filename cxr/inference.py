"""`cxr predict`: a model over a folder or bucket of studies (PNG, JPEG, DICOM), on Ray, into one table.

The files are listed up front, then Ray Data streams batches of paths through read tasks, which read and
preprocess them exactly as training did (`cxr.data.images`: any PNG/JPEG/DICOM → 8-bit gray → the model's
size), into a pool of actors, each holding the model once, so files are decoded while the model predicts. A
file that cannot be read or decoded never stops the run: it becomes an error row with its reason. The driver streams the
batches back (a progress bar with img/s) and writes one row per readable image, in input order, with the 14
probabilities and where they came from (model URI and version, the training data's fingerprint), plus
`<out>.errors.csv` for the rest: readable rows + error rows = input files.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr import storage
from cxr.redact import redact

log = logging.getLogger(__name__)
EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
FILES_PER_CALL = 256  # a Ray task or actor call costs milliseconds: few large calls, the model's batch inside


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
    images = [f for f in found if f.lower().endswith(EXTENSIONS) or len(found) == 1]
    if not images:
        raise FileNotFoundError(f"{redact(spec)}: no image files ({', '.join(EXTENSIONS)})")
    return images


def _read_one(path: str, size: int) -> tuple[np.ndarray | None, str]:
    from cxr.data import images

    try:
        return images.preprocess(storage.read_bytes(path), size, name=os.path.basename(path)), ""
    except Exception as exc:  # noqa: BLE001 - any failure is this file's: listed with its reason
        return None, redact(f"{type(exc).__name__}: {exc}")


def read_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """A Ray Data task: a batch of paths → the model's inputs (uint8) and, for files that failed, why."""
    with ThreadPoolExecutor(4, thread_name_prefix="cxr-read") as pool:  # decoding releases the GIL
        read = list(pool.map(lambda p: _read_one(p, size), batch["path"]))
    pixels = np.zeros((len(read), size, size), np.uint8)
    for i, (image, _) in enumerate(read):
        if image is not None:
            pixels[i] = image
    return {"index": batch["index"], "path": batch["path"], "error": np.array([e for _, e in read], object),
            "pixels": pixels}


class Predictor:
    """A Ray Data actor: the model, loaded once, predicting batches that read tasks prepared beside it."""

    def __init__(self, model_uri: str, tracking_uri: str | None, threads: int, batch_size: int):
        import tensorflow as tf

        # Replicas share the node's cores: each gets its share, not a thread per core each.
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        from cxr.tracking import models

        self.model = models.load(model_uri, tracking_uri).model
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.flatnonzero(batch["error"] == "")
        probs = np.full((len(batch["error"]), int(self.model.output_shape[-1])), np.nan, np.float32)
        for start in range(0, ok.size, self.batch_size):
            rows = ok[start:start + self.batch_size]
            x = batch["pixels"][rows].astype(np.float32)[..., None] / np.float32(255.0)
            probs[rows] = np.asarray(self.model.predict_on_batch(x), np.float32)
        return {"index": batch["index"], "path": batch["path"], "error": batch["error"], "probs": probs}


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
    from cxr.quiet import quiet_ray_data
    from cxr.tracking import models

    if not out.endswith((".parquet", ".csv")):
        raise ValueError(f"--out {redact(out)}: the table is written as .parquet or .csv")
    paths = list_images(spec)
    loaded = models.load(model_uri, tracking_uri)  # fails here, once, if the URI is wrong
    provenance = {"model_uri": redact(model_uri),
                  "model_version": loaded.registered[1] if loaded.registered else "",
                  "training_fingerprint": loaded.tags.get("cxr.data.fingerprint", "")}
    init_ray()  # before `import ray`: a local Ray's loopback settings are read at import
    import ray

    quiet_ray_data()
    resources = ray.cluster_resources()
    cpus, gpus = max(1, int(resources.get("CPU", 1))), int(resources.get("GPU", 0))
    nodes = max(1, sum(1 for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")))
    # One replica per GPU; without GPUs one per node using its cores (two 1-thread replicas on 2 cores ran
    # at a third of one 2-thread replica's rate: docs/benchmarks.md).
    workers = num_workers or gpus or nodes
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts images and says img/s
    context.execution_options.preserve_order = True
    ds = ray.data.from_items([{"index": i, "path": p} for i, p in enumerate(paths)])
    # Reading runs in tasks beside the replicas, so files are decoded while the model predicts. A replica
    # books 3/4 of a CPU and a read task 1/4: replicas never hold every CPU and starve the reads.
    per_call = max(batch_size, min(FILES_PER_CALL, -(-len(paths) // workers)))  # every replica gets files
    ds = ds.map_batches(read_batch, fn_args=(loaded.image_size,), batch_size=per_call,
                        compute=ray.data.TaskPoolStrategy(size=workers), num_cpus=0.25)
    ds = ds.map_batches(Predictor, fn_constructor_args=(model_uri, tracking_uri, max(1, cpus // workers), batch_size),
                        batch_size=per_call, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=0.75,
                        num_gpus=1 if gpus else 0)
    rows, errors = [], []
    t0 = time.perf_counter()
    with tqdm(total=len(paths), unit="img", desc="predict", disable=not progress) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
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
