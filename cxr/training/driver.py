"""The driver's side of training: check and plan before any worker starts, start Ray Train, read its result.

Everything a wrong config can break is found here first (the data's splits and sizes, the image size, the
resources the workers need), so a typo costs seconds, not a cluster start-up. Then Ray Train's
TensorflowTrainer runs `cxr.training.loop.train_loop_per_worker` on `scaling.num_workers` workers; re-running
with the same `run.storage_path` + `run.name` resumes from the latest checkpoint. Ray keeps the best
`run.checkpoints_to_keep` checkpoints by validation mean AUROC (plus the latest).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from cxr import config as cfgmod
from cxr import storage
from cxr.data.source import DataSource
from cxr.evaluation.metrics import SCORE
from cxr.redact import redact
from cxr.training.checkpoints import CONFIG_FILE
from cxr.training.loop import EpochCallback, RunPlan, train_loop_per_worker

log = logging.getLogger(__name__)


def plan_run(cfg: cfgmod.Config, source: DataSource) -> RunPlan:
    """Split sizes, steps per epoch (train size // global batch) and, for the weighted loss, counts.

    Reads the manifest (or the raw root's metadata), so a wrong path, split or image size fails here.
    """
    data, optim = cfg.data, cfg.optim
    stored = source.stored_size(data)
    if stored is not None and data.image_size > stored and not data.allow_upsample:
        raise ValueError(f"data.image_size {data.image_size} is larger than the {stored} px images stored in "
                         f"{redact(data.location)}: they would be upsampled (blurred). Prepare shards with "
                         f"--size {data.image_size} or more, or set data.allow_upsample=true")
    train_size = int(source.split_size(data, data.train_split))
    val_size = int(source.split_size(data, data.val_split))
    global_batch = optim.batch_size * cfg.scaling.num_workers
    steps = optim.steps_per_epoch or train_size // global_batch
    if steps < 1:
        raise ValueError(f"train split has {train_size} images, fewer than one global batch of {global_batch}")
    if val_size < 1:
        raise ValueError(f"validation split {data.val_split!r} is empty")
    positives = total = None
    if optim.weighted_loss:
        positives, total = source.label_counts(data, data.train_split)
    return RunPlan(train_size, val_size, steps, positives, total, tuple(source.findings(data)))


def worker_resources(cfg: cfgmod.Config) -> dict[str, float]:
    """What one Ray Train worker asks for, as ScalingConfig resolves it (1 CPU, or 1 GPU with use_gpu)."""
    wanted = dict(cfg.scaling.resources_per_worker or {})
    if not wanted:
        wanted = {"CPU": 1.0}
    if cfg.scaling.use_gpu:
        wanted.setdefault("GPU", 1.0)
    return {k: float(v) for k, v in wanted.items() if float(v) > 0}


def workers_that_fit(bundle: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many workers of `bundle` the nodes' total resources can hold (first fit; a worker is one node's)."""
    free = [dict(n) for n in nodes]
    placed = 0
    for node in free:
        while all(node.get(k, 0.0) >= v for k, v in bundle.items()):
            for k, v in bundle.items():
                node[k] -= v
            placed += 1
    return placed


def require_resources(cfg: cfgmod.Config, local: bool, poll_s: float = 5.0) -> None:
    """Fail before the trainer starts when its workers cannot be placed: Ray Train would wait for them forever.

    A local Ray never grows, so it is checked once; a cluster may be autoscaling, so it gets
    `scaling.resources_timeout_s` to provide the resources.
    """
    import ray

    bundle, wanted = worker_resources(cfg), cfg.scaling.num_workers
    deadline = time.monotonic() + (0.0 if local else cfg.scaling.resources_timeout_s)
    waited = False
    while True:
        nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]
        fit = workers_that_fit(bundle, nodes)
        if fit >= wanted:
            return
        if time.monotonic() >= deadline:
            have = {k: sum(n.get(k, 0.0) for n in nodes) for k in bundle}
            need = {k: v * wanted for k, v in bundle.items()}
            waited_s = cfg.scaling.resources_timeout_s
            where = "this machine's local Ray" if local else f"the cluster after {waited_s:.0f} s"
            raise ValueError(
                f"scaling.num_workers={wanted} workers of {bundle} need {need}; {where} has {have} on {len(nodes)} "
                f"node(s), room for {fit} worker(s). Lower scaling.num_workers or scaling.resources_per_worker, "
                "or run on a cluster with more resources")
        if not waited:
            log.warning("waiting up to %.0f s for resources: %d of %d workers of %s fit now",
                        cfg.scaling.resources_timeout_s, fit, wanted, bundle)
        waited = True
        time.sleep(poll_s)


def run_trainer(cfg: cfgmod.Config, source: DataSource, plan: RunPlan,
                callbacks: Sequence[EpochCallback] = (), run_callbacks: Sequence[Any] = ()) -> Any:
    """Run Ray Train's TensorflowTrainer for `cfg`; returns Ray's Result (metrics, checkpoints).

    `run_callbacks` go into the RunConfig (Ray Train callbacks, e.g. Tune's TuneReportCallback in a sweep's trial)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from cxr import quiet

    cfgmod.write_resolved(cfg, storage.join(run_path(cfg), CONFIG_FILE))
    log.info("training %s at %d px on %d worker(s): %d steps/epoch of %d images, %d val images",
             cfg.model.name, cfg.data.image_size, cfg.scaling.num_workers, plan.steps_per_epoch,
             cfg.optim.batch_size * cfg.scaling.num_workers, plan.val_size)
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "plan": plan, "source": source,
                           "callbacks": list(callbacks)},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=cfg.scaling.resources_per_worker),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=_absolute(cfg.run.storage_path), callbacks=list(run_callbacks) or None,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            # Ray Train's INFO lines repeat every metric of every worker each epoch; cxr prints its own.
            logging_config=LoggingConfig(log_level="INFO" if quiet.verbose() else "WARNING"),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep,
                                               checkpoint_score_attribute=SCORE, checkpoint_score_order="max")),
    )
    return trainer.fit()


def best_checkpoint(result: Any) -> tuple[Any, dict[str, Any]]:
    """(checkpoint, its metrics) of the epoch with the best validation mean AUROC; (None, {}) if none."""
    if not result.best_checkpoints:
        return None, {}
    best = result.get_best_checkpoint(metric=SCORE, mode="max")
    return best, next((m for c, m in result.best_checkpoints if best and c.path == best.path), {})


def summarize(result: Any) -> dict[str, Any]:
    """Latest metrics, best epoch and the paths of the best and latest checkpoints of a Ray Result."""
    best, best_metrics = best_checkpoint(result)
    metrics = result.metrics or {}
    return {
        "run_path": result.path,
        "epochs_done": int(metrics.get("epoch", 0)),
        "stopped_early": bool(metrics.get("stopped_early", False)),
        "best_epoch": best_metrics.get("epoch"),
        "best_val_auroc_mean": best_metrics.get(SCORE),
        "best_checkpoint": best.path if best else None,
        "latest_checkpoint": result.checkpoint.path if result.checkpoint else None,
        "metrics": metrics,
    }


def result_at(path: str) -> Any:
    """The Ray Train Result of a run from its storage folder (a sweep's trial, scored after Tune is done)."""
    from ray.train import Result

    return Result.from_path(path)


def run_path(cfg: cfgmod.Config) -> str:
    """Where the run's checkpoints live: `run.storage_path`/`run.name`; the run's identity across re-submits."""
    return storage.join(_absolute(cfg.run.storage_path), cfg.run.name)


def _absolute(path: str) -> str:
    """Ray Train wants an absolute local path or a URI."""
    return path if "://" in path else os.path.abspath(path)
