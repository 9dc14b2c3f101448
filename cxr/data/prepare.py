"""`cxr prepare`: the driver that fans shard conversion out over Ray tasks and writes the manifest."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from cxr import storage
from cxr.cluster import init_ray
from cxr.data import manifest, metadata, roots
from cxr.data.shards import Params, ShardSpec, committed_receipt, plan, write_shard

log = logging.getLogger(__name__)

TASK_RETRIES = 3  # Ray re-runs a shard whose worker died or whose storage stayed unavailable past its deadline
RESUME_THREADS = 8  # committed shards are hashed on the driver, this many at a time (I/O bound)


def prepare(data_root: str, out_uri: str, params: Params, num_workers: int | None = None,
            progress: bool = True, dataset: str | None = None) -> dict:
    """Convert every usable image of `data_root` into shards under `out_uri`; returns a summary.

    Shards already committed by an earlier run with the same parameters (and whose bytes still match their
    receipt's sha256) are kept, so a re-run after a crash converts only what is missing and ends with the
    same manifest. A shard that cannot be read or written fails the run, naming the object and the shard.
    `dataset`: a built-in spec name or a spec YAML (None or "nih": NIH's reader, output as it always was).
    """
    t0 = time.perf_counter()
    storage.limits()  # a malformed CXR_STORAGE_* value fails here, not in every Ray task
    ds = roots.read(data_root, dataset, seed=params.seed, val_fraction=params.val_fraction,
                    test_fraction=params.test_fraction)
    specs = plan(ds, params)
    for path in storage.remove_partial_writes(out_uri):
        log.info("removed a partial file of an interrupted run: %s", path)
    receipts: list[dict] = []
    todo: list[ShardSpec] = []
    with ThreadPoolExecutor(max_workers=RESUME_THREADS) as pool:
        for spec, done in zip(specs, pool.map(lambda s: committed_receipt(out_uri, s, params), specs), strict=True):
            if done:
                receipts.append(done)
            else:
                todo.append(spec)
    skipped = len(receipts)
    log.info("%d shards planned, %d already committed, %d to write", len(specs), skipped, len(todo))

    init_ray(num_cpus=num_workers)  # before `import ray`: a local Ray's loopback settings are read at import
    import ray

    parallel = num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=[storage.StorageUnavailable])(
        write_shard)
    limits_env = {k: os.environ[k] for k in storage.ENV_VARS if k in os.environ}
    if limits_env:  # a cluster joined via RAY_ADDRESS does not inherit this process's environment
        task = task.options(runtime_env={"env_vars": limits_env})
    total = sum(len(s.rows) for s in todo)
    bar = tqdm(total=total, unit="img", desc="prepare", disable=not progress)
    pending: dict[object, ShardSpec] = {}  # ObjectRef -> its shard
    failures: list[tuple[ShardSpec, BaseException]] = []
    queue = list(todo)
    while queue or pending:
        while queue and not failures and len(pending) < parallel:  # after a failure, only drain what runs
            spec = queue.pop(0)
            pending[task.remote(spec, out_uri, params)] = spec
        if not pending:
            break
        ready, _ = ray.wait(list(pending), num_returns=1)
        spec = pending.pop(ready[0])
        try:
            receipt = ray.get(ready[0])
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None) or exc
            log.error("shard %s failed: %s", spec.key, cause)
            failures.append((spec, cause))
            continue
        receipts.append(receipt)
        bar.update(receipt["records"] + len(receipt["quarantine"]))
        bar.set_postfix(quarantined=sum(len(r["quarantine"]) for r in receipts))
    bar.close()
    if failures:
        raise _run_failed(failures, committed=len(receipts) - skipped)

    if isinstance(ds, metadata.Dataset):
        built = manifest.build(ds, params.as_dict(), receipts)
    else:
        built = manifest.build_spec(ds, params.as_dict(), receipts)
    url = manifest.write(out_uri, built)
    seconds = time.perf_counter() - t0
    written = receipts[skipped:]
    converted = sum(r["records"] for r in written)
    return {
        "manifest": url,
        "images": sum(s["images"] for s in built["splits"].values()),
        "converted": converted,
        "shards_written": len(written),
        "shards_kept": skipped,
        "bytes": sum(r["bytes"] for r in receipts),
        "quarantined": len(built["quarantine"]),
        "notes": len(built["notes"]),
        "excluded_by_metadata": len(built["excluded_by_metadata"]),
        "seconds": round(seconds, 2),
        "images_per_second": round(converted / seconds, 1) if seconds else 0.0,
        **({"excluded_counts": built["excluded_counts"]} if "excluded_counts" in built else {}),
    }


def _run_failed(failures: list[tuple[ShardSpec, BaseException]], committed: int) -> Exception:
    """One error for the run: the first failed shard's own message (object and shard), then what is left."""
    spec, cause = failures[0]
    runs = 1 + TASK_RETRIES if isinstance(cause, storage.StorageUnavailable) else 1
    shard = "" if spec.key in str(cause) else f"shard {spec.key}: "
    message = (f"{shard}{cause} [the shard's task ran {runs} time(s); {len(failures)} shard(s) failed, no manifest "
               f"written; the {committed} shard(s) committed in this run are kept by a re-run]")
    # The cause's own type where it has a plain message constructor, so callers can tell storage from bugs.
    kind = type(cause) if isinstance(cause, storage.StorageError | FileNotFoundError) else RuntimeError
    error = kind(message)
    error.__cause__ = cause
    return error
