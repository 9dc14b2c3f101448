"""`cxr prepare`: the driver that fans shard conversion out over Ray tasks and writes the manifest."""

from __future__ import annotations

import logging
import time

from tqdm import tqdm

from cxr import storage
from cxr.cluster import init_ray
from cxr.data import manifest, metadata
from cxr.shards import Params, committed_receipt, plan, write_shard

log = logging.getLogger(__name__)


def prepare(data_root: str, out_uri: str, params: Params, num_workers: int | None = None,
            progress: bool = True) -> dict:
    """Convert every usable image of `data_root` into shards under `out_uri`; returns a summary.

    Shards already committed by an earlier run with the same parameters are kept, so a re-run after a
    crash converts only what is missing and ends with the same manifest.
    """
    import ray

    t0 = time.perf_counter()
    ds = metadata.load(data_root, seed=params.seed, val_fraction=params.val_fraction,
                       test_fraction=params.test_fraction)
    if not ds.images_present:
        raise FileNotFoundError(f"{data_root}: no images/ or images_0NN/images/ folder; nothing to prepare")
    specs = plan(ds, params)
    for path in storage.remove_partial_writes(out_uri):
        log.info("removed a partial file of an interrupted run: %s", path)
    receipts, todo = [], []
    for spec in specs:
        done = committed_receipt(out_uri, spec, params)
        (receipts if done else todo).append(done or spec)
    skipped = len(receipts)
    log.info("%d shards planned, %d already committed, %d to write", len(specs), skipped, len(todo))

    init_ray(num_cpus=num_workers)
    parallel = num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    task = ray.remote(num_cpus=1, max_retries=3)(write_shard)
    total = sum(len(s.rows) for s in todo)
    bar = tqdm(total=total, unit="img", desc="prepare", disable=not progress)
    pending: list = []
    queue = list(todo)
    while queue or pending:
        while queue and len(pending) < parallel:
            pending.append(task.remote(queue.pop(0), out_uri, params))
        ready, pending = ray.wait(pending, num_returns=1)
        receipt = ray.get(ready[0])
        receipts.append(receipt)
        bar.update(receipt["records"] + len(receipt["quarantine"]))
        bar.set_postfix(quarantined=sum(len(r["quarantine"]) for r in receipts))
    bar.close()

    built = manifest.build(ds, params.as_dict(), receipts)
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
    }
