"""The per-worker training loop Ray Train runs: build, restore, then train → validate → checkpoint each epoch.

Each epoch ends with `ray.train.report` on all workers (a barrier); rank 0 attaches a checkpoint directory
(`cxr.training.checkpoints`) holding weights, optimizer state, the schedule, the metric history and the
resolved config; the other ranks report none (Ray Train V2 registers a checkpoint if any worker reports
one). A restarted worker group, or a run re-submitted with the same `run.storage_path` + `run.name`, gets the
latest checkpoint from `ray.train.get_checkpoint()` and continues with the next epoch. Epochs are numbered
from 1 everywhere (logs, metrics, checkpoints, MLflow steps).

What happens at the end of an epoch beyond the checkpoint is the callers' business: `callbacks` (objects
with `on_epoch_end(metrics)` and a `rank_zero_only` flag, as MONAI's handlers attach to engine events) are
called after the checkpoint is reported, so what they record is what a restart resumes from.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import keras
import numpy as np
import tensorflow as tf

from cxr import config as cfgmod
from cxr.data.source import DataSource
from cxr.evaluation.metrics import SCORE, auroc_metrics
from cxr.inference import predict_split
from cxr.labels import FINDINGS
from cxr.losses import loss_from_counts, mean_loss
from cxr.models import build_model
from cxr.redact import install_log_filter
from cxr.training.checkpoints import restore_checkpoint, save_checkpoint
from cxr.training.schedule import Schedule
from cxr.training.step import DistributedSteps, all_reduce, make_optimizer, make_strategy

log = logging.getLogger(__name__)


class EpochCallback(Protocol):
    """Called with each epoch's metrics once its checkpoint is reported (picklable: it travels to workers)."""

    rank_zero_only: bool

    def on_epoch_end(self, metrics: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class RunPlan:
    """What the driver works out once, before any worker starts, so every worker uses the same."""

    train_size: int
    val_size: int
    steps_per_epoch: int
    positives: list[int] | None = None
    total: int | None = None
    findings: tuple[str, ...] = FINDINGS  # the data's label set: sizes the head, names the metrics


@dataclass
class Worker:
    """Everything one worker's loop needs, built once."""

    cfg: cfgmod.Config
    plan: RunPlan
    source: DataSource
    rank: int
    world: int
    steps: DistributedSteps
    schedule: Schedule
    val_data: tf.data.Dataset
    history: list[dict[str, Any]] = field(default_factory=list)  # every epoch's metrics, carried by checkpoints
    resumes: list[int] = field(default_factory=list)  # epochs done at each restore from a checkpoint
    skipped: set[str] = field(default_factory=set)  # unreadable training images (raw mode), all workers'

    @property
    def optimizer(self) -> keras.optimizers.Optimizer:
        return self.steps.optimizer


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: build, restore if resuming, then train/validate/report per epoch.

    `loop_config` holds the resolved config as plain data ("config"), the driver's `RunPlan` ("plan"),
    the `DataSource` ("source") and the epoch callbacks ("callbacks"), as the driver puts them.
    """
    import ray.train

    _match_threads_to_cpus()
    strategy = make_strategy()  # first: MWMS must exist before any other TF op
    _configure_logging()
    cfg = cfgmod.validate(loop_config["config"])
    context = ray.train.get_context()
    worker = _build_worker(cfg, loop_config["plan"], loop_config["source"], strategy,
                           context.get_world_rank(), context.get_world_size())
    callbacks = [cb for cb in loop_config.get("callbacks") or () if worker.rank == 0 or not cb.rank_zero_only]
    start = _restore_latest(worker)
    for epoch in range(start + 1, cfg.optim.epochs + 1):
        if worker.schedule.stopped:
            break
        metrics = {"epoch": epoch, "lr": worker.schedule.lr, **_train_epoch(worker, epoch)}
        metrics.update(_validate_epoch(worker, epoch))
        _log_epoch(worker, metrics)
        _report(worker, epoch, metrics)
        for callback in callbacks:
            callback.on_epoch_end(metrics)


def _match_threads_to_cpus() -> None:
    """Size TF's thread pools to the CPUs Ray gave this worker (Ray exports it as OMP_NUM_THREADS).

    TF otherwise sizes them to every core of the machine, and workers sharing a node oversubscribe it.
    """
    cpus = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if cpus > 0:
        tf.config.threading.set_intra_op_parallelism_threads(cpus)
        tf.config.threading.set_inter_op_parallelism_threads(max(2, cpus))


def _configure_logging() -> None:
    """cxr's INFO lines, everyone else's warnings (Ray Train's per-report INFO lines name no logger of theirs)."""
    from cxr import quiet

    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger().setLevel(logging.INFO if quiet.verbose() else logging.WARNING)
    logging.getLogger("cxr").setLevel(logging.INFO)
    install_log_filter()  # worker logs are files on every node: no credentials in them


def _build_worker(cfg: cfgmod.Config, plan: RunPlan, source: DataSource, strategy: tf.distribute.Strategy,
                  rank: int, world: int) -> Worker:
    if strategy.num_replicas_in_sync != world:
        raise RuntimeError(f"{strategy.num_replicas_in_sync} replicas for {world} workers: "
                           "cxr runs exactly one replica (one device) per Ray worker")
    keras.mixed_precision.set_global_policy(cfg.scaling.precision)
    keras.utils.set_random_seed(cfg.data.seed)
    with strategy.scope():
        model = build_model(cfg.model.name, cfg.data.image_size, cfg.model.dropout, cfg.model.weights,
                            findings=plan.findings, tracking_uri=cfg.tracking.tracking_uri)
        optimizer = make_optimizer(cfg.optim.lr, cfg.scaling.precision)
        optimizer.build(model.trainable_variables)
    loss_fn = loss_from_counts(cfg.optim.weighted_loss, plan.positives, plan.total)
    steps = DistributedSteps(strategy, model, optimizer, loss_fn, cfg.optim.batch_size * world, seed=cfg.data.seed)
    o = cfg.optim
    schedule = Schedule(lr=o.lr, kind=o.lr_schedule, epochs=o.epochs, patience=o.plateau_patience,
                        factor=o.plateau_factor, min_lr=o.min_lr, stop_patience=o.early_stopping_patience)
    val_data = source.make_dataset(cfg.data, cfg.data.val_split, o.eval_batch_size or 2 * o.batch_size,
                                   worker_index=rank, num_workers=world, training=False)
    return Worker(cfg, plan, source, rank, world, steps, schedule, val_data)


def _restore_latest(worker: Worker) -> int:
    """The last epoch done: 0, or the latest checkpoint's (restoring everything from it)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    # A private copy per worker: as_directory() shares one temporary folder among the workers of a host, and a
    # worker read optimizer.npz there while another was still writing it (EOFError in a two-node rehearsal).
    with tempfile.TemporaryDirectory(prefix="cxr-restore-") as directory:
        checkpoint.to_directory(directory)
        state = restore_checkpoint(directory, worker.steps.model, worker.optimizer)
    worker.steps.seed_dropout(state.get("dropout_draws"))  # each replica's masks continue where they were
    done = int(state["epoch"])
    worker.schedule = worker.schedule.restored(state["schedule"])
    worker.history = list(state.get("history", []))
    worker.resumes = [*state.get("resumes", []), done]
    worker.skipped = set(state.get("skipped", []))
    if worker.rank == 0:
        log.info("resumed after epoch %d (best %.4f at epoch %d, lr %.3g)", done, worker.schedule.best_score,
                 worker.schedule.best_epoch, worker.schedule.lr)
    return done


def _train_batches(worker: Worker, epoch: int) -> tuple[tf.data.Dataset, Iterator[tuple[tf.Tensor, tf.Tensor]]]:
    """Exactly steps_per_epoch batches (the same count on every worker) of this worker's part of the split."""
    cfg = worker.cfg
    dataset = worker.source.make_dataset(cfg.data, cfg.data.train_split, cfg.optim.batch_size,
                                         worker_index=worker.rank, num_workers=worker.world, training=True,
                                         epoch=epoch)
    return dataset, iter(dataset.repeat().take(worker.plan.steps_per_epoch))


class Throughput:
    """Wall-clock step time and images/s over a window of steps (per worker and all workers)."""

    def __init__(self, batch: int, workers: int):
        self.batch, self.workers = batch, workers
        self.t0 = self.dt = math.nan
        self.first_step = 1
        self.steps = 0

    def start(self, after_step: int = 1) -> None:
        self.t0, self.first_step = time.perf_counter(), after_step

    def stop(self, step: int) -> None:
        self.dt, self.steps = time.perf_counter() - self.t0, step - self.first_step

    def metrics(self) -> dict[str, float]:
        if self.steps <= 0:
            return {"step_time_s": math.nan, "images_per_s_worker": math.nan, "images_per_s_total": math.nan}
        per_worker = self.batch * self.steps / self.dt
        return {"step_time_s": self.dt / self.steps, "images_per_s_worker": per_worker,
                "images_per_s_total": per_worker * self.workers}

    def describe(self) -> str:
        m = self.metrics()
        return (f"{m['step_time_s'] * 1000:.0f} ms/step, {m['images_per_s_worker']:.1f} img/s/worker, "
                f"{m['images_per_s_total']:.1f} img/s total")


def _train_epoch(worker: Worker, epoch: int) -> dict[str, float]:
    """Run the epoch's steps; log loss, step time and throughput every `steps_per_log` steps on rank 0."""
    worker.optimizer.learning_rate = worker.schedule.lr  # the schedule owns the lr; set before any step
    total_steps, every = worker.plan.steps_per_epoch, worker.cfg.optim.steps_per_log
    batch = worker.cfg.optim.batch_size
    loss_sum = tf.zeros([2])
    window = Throughput(batch, worker.world)
    epoch_rate = Throughput(batch, worker.world)
    dataset, batches = _train_batches(worker, epoch)
    for step, (images, labels) in enumerate(batches, start=1):
        out = worker.steps.train_step(images, labels)
        loss_sum += out
        if step == 1:  # the first step includes tracing: time from its end
            out.numpy()
            window.start()
            epoch_rate.start()
        elif step % every == 0 or step == total_steps:
            values = out.numpy()
            window.stop(step)
            epoch_rate.stop(step)
            if worker.rank == 0 and step < total_steps:  # the epoch's own line follows the last step
                log.info("epoch %d step %d/%d loss %.4f grad_norm %.3g | %s", epoch, step, total_steps,
                         values[0], values[1], window.describe())
            window.start(step)
    means = loss_sum.numpy() / total_steps
    if worker.source.may_skip:
        _gather_skipped(worker, getattr(dataset, "stats", None))
    return {"train_loss": float(means[0]), "grad_norm": float(means[1]), **epoch_rate.metrics(),
            "skipped_images": float(len(worker.skipped))}


def _gather_skipped(worker: Worker, stats: Any) -> None:
    """Every worker's unreadable training images, known to all (one all-reduce over the split's positions)."""
    from cxr.data.source import raw_rows

    rows = raw_rows(worker.cfg.data, worker.cfg.data.train_split)
    position = {url: k for k, (url, _) in enumerate(rows)}
    mine = np.zeros(len(rows), np.float32)
    for url in [*(stats.skipped if stats is not None else ()), *worker.skipped]:
        mine[position[url]] = 1.0
    everyone = all_reduce(worker.steps.strategy, mine)
    worker.skipped = {rows[k][0] for k in np.flatnonzero(everyone > 0)}


def _validate_epoch(worker: Worker, epoch: int) -> dict[str, Any]:
    """Sync BN statistics, predict the whole val split on all workers, update the schedule (lr, best, stop)."""
    t0 = time.perf_counter()
    steps = worker.steps
    steps.sync_moving_statistics()
    preds = predict_split(steps.predict, worker.val_data, worker.plan.val_size,
                          reduce=lambda rows: all_reduce(steps.strategy, rows), allow_missing=worker.source.may_skip,
                          outputs=len(worker.plan.findings))
    probs, labels = preds.present()
    metrics: dict[str, Any] = {"val_loss": mean_loss(steps.loss_fn, labels, probs),
                               **auroc_metrics(labels, probs, "val", worker.plan.findings),
                               "val_images_skipped": float(preds.missing)}
    is_best = worker.schedule.update(epoch, metrics[SCORE])
    metrics.update(eval_time_s=time.perf_counter() - t0, is_best=is_best, next_lr=worker.schedule.lr,
                   best_epoch=worker.schedule.best_epoch, best_val_auroc_mean=worker.schedule.best_score,
                   stopped_early=worker.schedule.stopped)
    return metrics


def _log_epoch(worker: Worker, m: dict[str, Any]) -> None:
    if worker.rank == 0:
        skipped = f", {int(m['skipped_images'])} unreadable images skipped" if m.get("skipped_images") else ""
        log.info("epoch %d: train loss %.4f, val loss %.4f, val mean AUROC %.4f%s, %.1f img/s total; "
                 "next lr %.3g%s%s", m["epoch"], m["train_loss"], m["val_loss"], m[SCORE],
                 " (best)" if m["is_best"] else "", m["images_per_s_total"], m["next_lr"], skipped,
                 " - stopping early" if m["stopped_early"] else "")


def _report(worker: Worker, epoch: int, metrics: dict[str, Any]) -> None:
    """Every worker reports (a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    worker.history.append(metrics)
    if worker.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    state = {"epoch": epoch, "schedule": worker.schedule.state(), "metrics": metrics, "history": worker.history,
             "resumes": worker.resumes, "plan": asdict(worker.plan), "skipped": sorted(worker.skipped),
             "dropout_draws": worker.steps.dropout_draws()}
    with tempfile.TemporaryDirectory(prefix="cxr-ckpt-") as directory:
        save_checkpoint(directory, worker.steps.model, worker.optimizer, state, cfgmod.to_yaml(worker.cfg))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
