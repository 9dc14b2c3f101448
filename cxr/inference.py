"""Running a model over images, the one way cxr does it: a pool of model replicas on the cluster's workers.

`cxr predict`, test scoring after training, `cxr evaluate`, `cxr promote` and `cxr explain`'s scores all come
from here. The pool holds one replica per GPU, or one per node on CPU, each loading the model once from its
URI on its own worker (`cxr.models.loading`), so the driver, on a head with no GPU and a few CPUs, only
sends work and gathers probabilities. On one machine with no cluster the driver is the only node: there the
one replica runs in the driver process, the same `Predictor` reading the same way, because a local Ray and an
actor that imports TensorFlow (8 s here) cost more than the demo's scoring; a replica count asks for the pool.

Two kinds of work go through the same replicas, read by Ray Data tasks beside them, so that images are
read while the model predicts and a replica's process does nothing else (reading in the replica's own
process, through the input pipeline's threads, cost DenseNet-121 a quarter to a half of its rate: docs/benchmarks.md):
- files: the read tasks decode and size them (`cxr.data.images`, as training did); a file that cannot be read
  becomes an error row with its reason;
- a split of a config's data: each read task reads a part of the split through the input pipeline, exactly
  as validation reads it; the rows go to the replicas and come back with their positions and labels.
Both travel as uint8 pixels, a quarter of float32's bytes through the object store; the replica makes them the
model's inputs with the pipeline's own last step (`augment.to_unit`), so the numbers are validation's.

A split's rows are gathered by position (`predict_split`), the routine the training loop's own validation
(collective, on the training workers) uses too: every image must be seen exactly once.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr.labels import NUM_FINDINGS
from cxr.redact import redact

log = logging.getLogger(__name__)
PER_CALL = 256  # images a Ray task or actor call handles: a call costs milliseconds, so few large ones
Reduce = Callable[[np.ndarray], np.ndarray]


# ------------------------------------------------------------------------------------- gathering a split


@dataclass(frozen=True)
class Predictions:
    """A split's probabilities and labels by position; `seen` marks the rows that were predicted."""

    probs: np.ndarray  # [N, model outputs] float32, NaN where unseen
    labels: np.ndarray  # [N, data findings] float32 (< 0: unknown, an uncertain label under `ignore`)
    seen: np.ndarray  # [N] bool

    @property
    def missing(self) -> int:
        return int((~self.seen).sum())

    def present(self) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, labels) of the rows that were predicted: what metrics are computed on."""
        return self.probs[self.seen], self.labels[self.seen]


def predict_split(predict: Callable[[Any], Any], batches: Iterable[tuple[Any, Any, Any]], n: int,
                  reduce: Reduce | None = None, allow_missing: bool = False, outputs: int = NUM_FINDINGS,
                  label_count: int | None = None) -> Predictions:
    """Run `predict` over (images, labels, index) batches of an N-image split and gather every row.

    Workers may hold different numbers of batches, so no collective runs per batch: each process fills a zero
    [N + 1, outputs + labels + 1] array at the images' positions (probabilities, labels, a count), and one
    reduction (an all-reduce SUM across workers, or nothing in one process) gives every process all N rows.
    Row N collects positions outside 0..N-1, so a bad index is reported by every worker after the one
    reduction instead of hanging the others. Raw mode may skip unreadable images (`allow_missing`): unseen
    rows are then reported and left out of the metrics. `outputs` is the model's, `label_count` the data's
    (they differ when a model is scored on another dataset's label set)."""
    k, kl = outputs, label_count if label_count is not None else outputs
    rows = np.zeros((n + 1, k + kl + 1), np.float32)
    for images, labels, index in batches:
        idx = np.asarray(index).astype(np.int64)
        idx = np.where((idx >= 0) & (idx < n), idx, n)
        block = np.concatenate([np.asarray(predict(images), np.float32), np.asarray(labels, np.float32),
                                np.ones((len(idx), 1), np.float32)], axis=1)
        np.add.at(rows, idx, block)
    if reduce is not None:
        rows = reduce(rows)
    counts = rows[:n, -1]
    stray, missing, repeated = int(rows[n, -1]), np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
    if stray or repeated.size or (missing.size and not allow_missing):
        raise RuntimeError(
            f"prediction must see each of {n} images exactly once: {missing.size} missing "
            f"(e.g. {missing[:5].tolist()}), {repeated.size} seen twice or more (e.g. {repeated[:5].tolist()}), "
            f"{stray} with an index outside 0..{n - 1}")
    seen = counts == 1
    probs = rows[:n, :k].copy()
    probs[~seen] = np.nan
    return Predictions(probs, rows[:n, k:k + kl].copy(), seen)


# ------------------------------------------------------------------------------------------ the replicas


def _read_one(path: str, size: int) -> tuple[np.ndarray | None, str]:
    from cxr import storage
    from cxr.data import images

    try:
        return images.preprocess(storage.read_bytes(path), size, name=path.rsplit("/", 1)[-1]), ""
    except Exception as exc:  # noqa: BLE001 - any failure is this file's: listed with its reason
        return None, redact(f"{type(exc).__name__}: {exc}")


def read_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """A Ray Data task: a batch of paths → the model's inputs (uint8) and, for files that failed, why."""
    with ThreadPoolExecutor(4, thread_name_prefix="cxr-read") as pool:  # decoding releases the GIL
        read = list(pool.map(lambda p: _read_one(p, size), batch["path"]))
    pixels = np.zeros((len(read), size, size, 1), np.uint8)
    for i, (image, _) in enumerate(read):
        if image is not None:
            pixels[i, ..., 0] = image
    return {"index": batch["index"], "path": batch["path"], "error": np.array([e for _, e in read], object),
            "pixels": pixels}


def read_parts(batch: dict[str, np.ndarray], data: Any, per_call: int) -> Iterator[dict[str, np.ndarray]]:
    """A Ray Data task: parts of splits → batches of `per_call` images as validation reads them, but for the last
    step (uint8 at the stored size), with their split, positions and labels; a generator, so each batch streams on
    as it is read (yields of a call's images, not of a model batch's: a yield costs Ray Data a conversion)."""
    from cxr.data import source as sources

    source = sources.for_config(data)
    for split, part, parts in zip(batch["split"], batch["part"], batch["parts"], strict=True):
        ds = source.make_dataset(data, str(split), per_call, worker_index=int(part), num_workers=int(parts),
                                 training=False, unit=False)
        for images, labels, index in ds.as_numpy_iterator():
            yield {"split": np.array([str(split)] * len(index), object), "index": index.astype(np.int64),
                   "labels": labels, "pixels": images}


class Predictor:
    """A replica: the model, loaded once on its worker, predicting read files or read rows of a split."""

    def __init__(self, model_uri: str, tracking_uri: str | None, threads: int, batch_size: int, image_size: int):
        if threads > 0:  # replicas share a node's cores: each gets its share (0: the driver's own settings)
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(threads)
        from cxr.models import loading

        self.model = loading.load(model_uri, tracking_uri).model
        self.batch_size, self.image_size = batch_size, image_size

    def _predict(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [B, S, S, 1] → probabilities, through the pipeline's last step, a batch at a time."""
        from cxr.data.augment import to_unit

        out = [np.asarray(self.model.predict_on_batch(to_unit(pixels[s:s + self.batch_size], self.image_size)),
                          np.float32) for s in range(0, len(pixels), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, int(self.model.output_shape[-1])), np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "split" in batch:  # rows of a split (`read_parts`)
            return {"split": batch["split"], "index": batch["index"], "labels": batch["labels"],
                    "probs": self._predict(batch["pixels"])}
        ok = np.flatnonzero(batch["error"] == "")
        probs = np.full((len(batch["error"]), int(self.model.output_shape[-1])), np.nan, np.float32)
        probs[ok] = self._predict(batch["pixels"][ok])
        return {"index": batch["index"], "path": batch["path"], "error": batch["error"], "probs": probs}


@dataclass(frozen=True)
class Pool:
    """How many replicas, with how many threads each, and whether each holds a GPU; `local`: the one replica is
    this process."""

    replicas: int
    threads: int
    gpus: bool
    local: bool = False

    @classmethod
    def for_cluster(cls, replicas: int | None = None) -> Pool:
        """One replica per GPU; without GPUs one per node with CPUs, using its cores (two 1-thread replicas on
        2 cores ran at a third of one 2-thread replica's rate: docs/benchmarks.md). Off a cluster, unless a
        count is asked for, the driver itself; with a count, a local Ray is started if the process has none."""
        if replicas is None and not on_cluster():
            return cls(1, 0, False, local=True)
        from cxr.cluster import init_ray

        init_ray()  # before `import ray`: a local Ray's loopback settings are read at import
        import ray

        from cxr.quiet import quiet_ray_data

        quiet_ray_data()
        resources = ray.cluster_resources()
        cpus, gpus = max(1, int(resources.get("CPU", 1))), int(resources.get("GPU", 0))
        nodes = max(1, sum(1 for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")))
        count = replicas or gpus or nodes
        return cls(count, max(1, cpus // count), bool(gpus))

    def map(self, ds: Any, model_uri: str, tracking_uri: str | None, batch_size: int, per_call: int,
            image_size: int) -> Any:
        """`ds` (read rows) through the replicas. A replica books 3/4 of a CPU and a read task 1/4: replicas
        never hold every CPU and starve the reads.

        Replicas are not restarted (`max_restarts=0`): Ray Data hands them their code through the object store,
        which Ray says a restart cannot rely on (and prints so through the progress bar); a replica lost with
        its node fails the command, which exits non-zero with nothing half-written, and a re-run starts afresh."""
        import warnings

        import ray
        from ray.util.annotations import RayDeprecationWarning

        args = (model_uri, tracking_uri, self.threads, batch_size, image_size)
        with warnings.catch_warnings():  # Ray 2.60 names no parameter for it yet, only the generic remote args
            warnings.simplefilter("ignore", RayDeprecationWarning)
            return ds.map_batches(Predictor, fn_constructor_args=args,
                                  batch_size=per_call, compute=ray.data.ActorPoolStrategy(size=self.replicas),
                                  num_cpus=0.75, num_gpus=1 if self.gpus else 0, max_restarts=0)


def on_cluster() -> bool:
    """A job's cluster (RAY_ADDRESS, as `ray job submit` sets) or a Ray this process joined; not cxr's local Ray."""
    if os.environ.get("RAY_ADDRESS"):
        return True
    ray = sys.modules.get("ray")
    from cxr.cluster import started_local

    return ray is not None and ray.is_initialized() and not started_local()


def _context(ordered: bool) -> None:
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts images and says img/s
    context.execution_options.preserve_order = ordered


def predict_files(model_uri: str, paths: Sequence[str], image_size: int, tracking_uri: str | None = None,
                  batch_size: int = 32, replicas: int | None = None,
                  per_call: int = PER_CALL) -> Iterator[dict[str, np.ndarray]]:
    """Batches of (index, path, error, probs) for `paths`, in input order, as the replicas finish them."""
    pool = Pool.for_cluster(replicas)  # before `import ray`: a local Ray's loopback settings are read at import
    per_call = max(batch_size, min(per_call, -(-len(paths) // pool.replicas)))  # every replica gets files
    if pool.local:
        yield from _files_here(Predictor(model_uri, tracking_uri, 0, batch_size, image_size), paths, image_size,
                               per_call)
        return
    import ray

    _context(ordered=True)
    ds = ray.data.from_items([{"index": i, "path": p} for i, p in enumerate(paths)])
    ds = ds.map_batches(read_batch, fn_args=(image_size,), batch_size=per_call,
                        compute=ray.data.TaskPoolStrategy(size=pool.replicas), num_cpus=0.25)
    yield from pool.map(ds, model_uri, tracking_uri, batch_size, per_call, image_size).iter_batches(
        batch_size=None, batch_format="numpy")


def _files_here(replica: Predictor, paths: Sequence[str], image_size: int,
                per_call: int) -> Iterator[dict[str, np.ndarray]]:
    """The files through a replica in this process, the next call's files read while the model predicts."""
    calls = [{"index": np.arange(s, min(s + per_call, len(paths))), "path": np.array(paths[s:s + per_call], object)}
             for s in range(0, len(paths), per_call)]
    with ThreadPoolExecutor(1, thread_name_prefix="cxr-read-ahead") as ahead:
        pending = ahead.submit(read_batch, calls[0], image_size) if calls else None
        for i in range(len(calls)):
            batch = pending.result()
            pending = ahead.submit(read_batch, calls[i + 1], image_size) if i + 1 < len(calls) else None
            yield replica(batch)


def predict_splits(model_uri: str, data: Any, splits: Sequence[str], outputs: int, batch_size: int = 64,
                   tracking_uri: str | None = None, replicas: int | None = None, progress: bool = True,
                   per_call: int = PER_CALL) -> dict[str, Predictions]:
    """The model at `model_uri` over whole splits of a config's data (`cxr.config.Data`), in one pool: each
    replica loads the model once for all of them. The driver reads only the splits' sizes."""
    from tqdm import tqdm

    from cxr.data import source as sources

    source = sources.for_config(data)
    sizes = {s: int(source.split_size(data, s)) for s in dict.fromkeys(splits)}
    labels_k = len(sources.findings(data))
    pool = Pool.for_cluster(replicas)
    got: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {s: [] for s in sizes}
    t0 = time.perf_counter()
    with tqdm(total=sum(sizes.values()), unit="img", desc="score " + "+".join(sizes), disable=not progress) as bar:
        for batch in _split_rows(pool, model_uri, tracking_uri, batch_size, data, list(sizes), per_call):
            for split in sizes:
                mine = batch["split"] == split
                if mine.any():
                    got[split].append((batch["probs"][mine], batch["labels"][mine], batch["index"][mine]))
            bar.update(len(batch["index"]))
    log.debug("scored %s images of %s in %.1f s on %s", sum(sizes.values()), "+".join(sizes),
              time.perf_counter() - t0, "this process" if pool.local else f"{pool.replicas} replicas")
    out = {}
    for split, n in sizes.items():
        out[split] = predict_split(lambda probs: probs, got[split], n, allow_missing=source.may_skip,
                                   outputs=outputs, label_count=labels_k)
    return out


def _split_rows(pool: Pool, model_uri: str, tracking_uri: str | None, batch_size: int, data: Any,
                splits: list[str], per_call: int = PER_CALL) -> Iterator[dict[str, np.ndarray]]:
    """(split, index, probs, labels) rows of every part of `splits`, about `per_call` at a time, from the pool
    or from this process: read tasks (`read_parts`) feed the replicas."""
    parts = pool.replicas
    items = {"split": [s for s in splits for _ in range(parts)], "part": [p for _ in splits for p in range(parts)],
             "parts": [parts] * (len(splits) * parts)}
    if pool.local:
        replica = Predictor(model_uri, tracking_uri, 0, batch_size, data.image_size)
        for rows in read_parts({k: np.array(v) for k, v in items.items()}, data, per_call):
            yield replica(rows)
        return
    import ray

    _context(ordered=False)  # rows carry their positions
    # Ray Data gathers a generator's yields into one block until it reaches the target block size (128 MiB):
    # a part would reach the replicas in a few large blocks. `per_call` images' bytes makes a block of about
    # one call, sent on as it is read. A dataset copies the context when it is made: set before, restored after.
    from cxr.data import source as sources

    side = sources.for_config(data).stored_size(data) or data.image_size
    context = ray.data.DataContext.get_current()
    block, context.target_max_block_size = context.target_max_block_size, per_call * side ** 2
    try:
        rows = [dict(zip(items, values, strict=True)) for values in zip(*items.values(), strict=True)]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        ds = ds.map_batches(read_parts, fn_args=(data, per_call), batch_size=1,
                            compute=ray.data.TaskPoolStrategy(size=pool.replicas), num_cpus=0.25)
        yield from pool.map(ds, model_uri, tracking_uri, batch_size, per_call, data.image_size).iter_batches(
            batch_size=None, batch_format="numpy")
    finally:
        context.target_max_block_size = block
