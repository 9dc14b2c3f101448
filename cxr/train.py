"""Distributed training: Ray Train starts the workers, each runs the epochs of `train_loop_per_worker`.

The step itself (strategy, optimizer, train step, gathered evaluation) is `cxr.distributed`; the
checkpoint format is `cxr.checkpoints`.

Each epoch ends with `ray.train.report` on all workers (a barrier); rank 0 attaches a checkpoint
directory holding model weights, optimizer state, the schedule (epoch, best so far, lr, patience
counters) and the resolved config, the other ranks report none (Ray Train V2 registers a checkpoint
if any worker reports one). A restarted worker group, or a run re-submitted with the same
`run.storage_path` + `run.name`, gets the latest checkpoint from `ray.train.get_checkpoint()` and
continues with the next epoch. Ray keeps the best `run.checkpoints_to_keep` checkpoints by
validation mean AUROC (plus the latest); `fit` returns which one is best.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import keras
import tensorflow as tf

from cxr import config as cfgmod
from cxr import storage, tracking
from cxr.checkpoints import CONFIG_FILE, restore_checkpoint, save_checkpoint
from cxr.distributed import DistributedSteps, evaluate, make_optimizer, make_strategy
from cxr.labels import FINDINGS
from cxr.losses import Schedule, loss_from_counts
from cxr.metrics import SCORE
from cxr.models import build_model
from cxr.redact import install_log_filter, redact

log = logging.getLogger(__name__)

DatasetFn = Callable[..., tf.data.Dataset]
SizeFn = Callable[[str, str], int]
CountsFn = Callable[[str, str], tuple[list[int], int]]
StoredSizeFn = Callable[[str], int | None]


# ------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class DataSource:
    """Where batches come from: `make_dataset`/`split_size` as in cxr.pipeline, and label counts.

    `make_dataset(manifest_uri, split, batch_size, worker_index, num_workers, training, seed, epoch,
    image_size, augment=...)` yields (images, labels) when training and (images, labels, index) when
    not; `augment` (training only) is the config's `data.augment` as a dict. Tests plug in in-memory
    datasets with the same signature.
    """

    make_dataset: DatasetFn
    split_size: SizeFn
    label_counts: CountsFn
    stored_size: StoredSizeFn = lambda uri: None  # side of the stored images, None if not fixed


def manifest_label_counts(manifest_uri: str, split: str) -> tuple[list[int], int]:
    """(positives per finding, images) of a split, from the manifest `cxr prepare` wrote."""
    from cxr import pipeline

    part = pipeline.load_manifest(manifest_uri)["splits"][split]
    return [int(part["label_counts"][name]) for name in FINDINGS], int(part["images"])


def pipeline_dataset(*args: Any, augment: dict[str, Any] | None = None, **kwargs: Any) -> tf.data.Dataset:
    """cxr.pipeline.make_dataset, with the config's `data.augment` turned into its Augment."""
    from cxr import pipeline

    if augment is not None:
        fields = {k: v for k, v in augment.items() if k != "enabled"}
        fields["scale"] = tuple(fields["scale"])
        kwargs["augment"] = pipeline.Augment(**fields) if augment["enabled"] else pipeline.Augment.off()
    return pipeline.make_dataset(*args, **kwargs)


def pipeline_split_size(manifest_uri: str, split: str) -> int:
    from cxr import pipeline

    return pipeline.split_size(manifest_uri, split)


def manifest_stored_size(manifest_uri: str) -> int:
    from cxr import pipeline

    return int(pipeline.load_manifest(manifest_uri)["preprocessing"]["size"])


def data_source(
    dataset_fn: DatasetFn | None = None, size_fn: SizeFn | None = None, counts_fn: CountsFn | None = None
) -> DataSource:
    """The given callables, falling back to cxr.pipeline (imported only when used) and the manifest."""
    if dataset_fn is not None:
        return DataSource(dataset_fn, size_fn or pipeline_split_size, counts_fn or manifest_label_counts)
    return DataSource(pipeline_dataset, size_fn or pipeline_split_size, counts_fn or manifest_label_counts,
                      manifest_stored_size)


@dataclass(frozen=True)
class Plan:
    """What the driver works out once, before any worker starts, so every worker uses the same."""

    train_size: int
    val_size: int
    steps_per_epoch: int
    positives: list[int] | None = None
    total: int | None = None


def plan_run(cfg: cfgmod.Config, source: DataSource) -> Plan:
    """Split sizes, steps per epoch (train size // global batch) and, for the weighted loss, counts.

    Reads the manifest, so a wrong path, split or image size fails here, before Ray or MLflow start.
    """
    data, optim = cfg.data, cfg.optim
    stored = source.stored_size(data.manifest_uri)
    if stored is not None and data.image_size > stored and not data.allow_upsample:
        raise ValueError(f"data.image_size {data.image_size} is larger than the {stored} px images stored in "
                         f"{redact(data.manifest_uri)}: they would be upsampled (blurred). Prepare shards with "
                         f"--size {data.image_size} or more, or set data.allow_upsample=true")
    train_size = int(source.split_size(data.manifest_uri, data.train_split))
    val_size = int(source.split_size(data.manifest_uri, data.val_split))
    global_batch = optim.batch_size * cfg.scaling.num_workers
    steps = optim.steps_per_epoch or train_size // global_batch
    if steps < 1:
        raise ValueError(f"train split has {train_size} images, fewer than one global batch of {global_batch}")
    if val_size < 1:
        raise ValueError(f"validation split {data.val_split!r} is empty")
    positives = total = None
    if optim.weighted_loss:
        positives, total = source.label_counts(data.manifest_uri, data.train_split)
    return Plan(train_size, val_size, steps, positives, total)


# ------------------------------------------------------------------------------ per-worker loop


@dataclass
class Worker:
    """Everything one worker's loop needs, built once."""

    cfg: cfgmod.Config
    plan: Plan
    source: DataSource
    rank: int
    world: int
    steps: DistributedSteps
    schedule: Schedule
    val_data: tf.data.Dataset
    history: list[dict[str, Any]] = field(default_factory=list)  # every epoch's metrics, carried by checkpoints
    resumes: list[int] = field(default_factory=list)  # epochs done at each restore from a checkpoint

    @property
    def optimizer(self) -> keras.optimizers.Optimizer:
        return self.steps.optimizer


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: build, restore if resuming, then train/validate/report per epoch.

    `loop_config` holds the resolved config as plain data ("config"), the driver's `Plan` ("plan"),
    the `DataSource` ("source") and, optionally, the MLflow run to log epochs into ("tracking": uri,
    run_id), as `run_trainer` puts them.
    """
    import ray.train

    _match_threads_to_cpus()
    strategy = make_strategy()  # first: MWMS must exist before any other TF op
    _configure_logging()
    cfg = cfgmod.validate(loop_config["config"])
    context = ray.train.get_context()
    worker = _build_worker(cfg, loop_config["plan"], loop_config["source"], strategy,
                           context.get_world_rank(), context.get_world_size())
    start = _restore_latest(worker)
    live = loop_config.get("tracking")
    epoch_log = tracking.EpochLog(live["uri"], live["run_id"]) if live and worker.rank == 0 else None
    for epoch in range(start, cfg.optim.epochs):
        if worker.schedule.stopped:
            break
        metrics = {"epoch": epoch, "lr": worker.schedule.lr, **_train_epoch(worker, epoch)}
        metrics.update(_validate_epoch(worker, epoch))
        _log_epoch(worker, metrics)
        _report(worker, epoch, metrics)
        if epoch_log is not None:  # after the checkpoint: what MLflow shows, a restart resumes from
            epoch_log.log(metrics)


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


def _build_worker(cfg: cfgmod.Config, plan: Plan, source: DataSource, strategy: tf.distribute.Strategy,
                  rank: int, world: int) -> Worker:
    if strategy.num_replicas_in_sync != world:
        raise RuntimeError(f"{strategy.num_replicas_in_sync} replicas for {world} workers: "
                           "cxr runs exactly one replica (one device) per Ray worker")
    keras.mixed_precision.set_global_policy(cfg.scaling.precision)
    keras.utils.set_random_seed(cfg.data.seed)
    with strategy.scope():
        model = build_model(cfg.model.name, cfg.data.image_size, cfg.model.dropout, cfg.model.weights)
        optimizer = make_optimizer(cfg.optim.lr, cfg.scaling.precision)
        optimizer.build(model.trainable_variables)
    loss_fn = loss_from_counts(cfg.optim.weighted_loss, plan.positives, plan.total)
    steps = DistributedSteps(strategy, model, optimizer, loss_fn, cfg.optim.batch_size * world)
    o = cfg.optim
    schedule = Schedule(lr=o.lr, patience=o.plateau_patience, factor=o.plateau_factor, min_lr=o.min_lr,
                        stop_patience=o.early_stopping_patience)
    val_data = source.make_dataset(cfg.data.manifest_uri, cfg.data.val_split, o.eval_batch_size or 2 * o.batch_size,
                                   worker_index=rank, num_workers=world, training=False, seed=cfg.data.seed,
                                   epoch=0, image_size=cfg.data.image_size)
    return Worker(cfg, plan, source, rank, world, steps, schedule, val_data)


def _restore_latest(worker: Worker) -> int:
    """The first epoch to run: 0, or the one after the latest checkpoint's (restoring everything)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        state = restore_checkpoint(directory, worker.steps.model, worker.optimizer)
    worker.schedule = worker.schedule.restored(state["schedule"])
    worker.history = list(state.get("history", []))
    worker.resumes = [*state.get("resumes", []), int(state["epoch"]) + 1]
    if worker.rank == 0:
        log.info("resumed after epoch %d (best %.4f at epoch %d, lr %.3g)", state["epoch"] + 1,
                 worker.schedule.best_score, worker.schedule.best_epoch + 1, worker.schedule.lr)
    return int(state["epoch"]) + 1


def _train_batches(worker: Worker, epoch: int) -> Iterator[tuple[tf.Tensor, tf.Tensor]]:
    """Exactly steps_per_epoch batches (the same count on every worker) of this worker's shard."""
    cfg = worker.cfg
    dataset = worker.source.make_dataset(
        cfg.data.manifest_uri, cfg.data.train_split, cfg.optim.batch_size, worker_index=worker.rank,
        num_workers=worker.world, training=True, seed=cfg.data.seed, epoch=epoch,
        image_size=cfg.data.image_size, augment=cfg.data.augment.model_dump())
    return iter(dataset.repeat().take(worker.plan.steps_per_epoch))


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
    for step, (images, labels) in enumerate(_train_batches(worker, epoch), start=1):
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
            if worker.rank == 0:
                log.info("epoch %d step %d/%d loss %.4f grad_norm %.3g | %s", epoch + 1, step, total_steps,
                         values[0], values[1], window.describe())
            window.start(step)
    means = loss_sum.numpy() / total_steps
    return {"train_loss": float(means[0]), "grad_norm": float(means[1]), **epoch_rate.metrics()}


def _validate_epoch(worker: Worker, epoch: int) -> dict[str, Any]:
    """Sync BN statistics, evaluate the whole val split, update the schedule (lr, best, stop)."""
    t0 = time.perf_counter()
    worker.steps.sync_moving_statistics()
    metrics: dict[str, Any] = evaluate(worker.steps, worker.val_data, worker.plan.val_size)
    is_best = worker.schedule.update(epoch, metrics[SCORE])
    metrics.update(eval_time_s=time.perf_counter() - t0, is_best=is_best, next_lr=worker.schedule.lr,
                   best_epoch=worker.schedule.best_epoch, best_val_auroc_mean=worker.schedule.best_score,
                   stopped_early=worker.schedule.stopped)
    return metrics


def _log_epoch(worker: Worker, m: dict[str, Any]) -> None:
    if worker.rank == 0:
        log.info("epoch %d: train loss %.4f, val loss %.4f, val mean AUROC %.4f%s, %.1f img/s total; "
                 "next lr %.3g%s", m["epoch"] + 1, m["train_loss"], m["val_loss"], m[SCORE],
                 " (best)" if m["is_best"] else "", m["images_per_s_total"], m["next_lr"],
                 " - stopping early" if m["stopped_early"] else "")


def _report(worker: Worker, epoch: int, metrics: dict[str, Any]) -> None:
    """Every worker reports (a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    worker.history.append(metrics)
    if worker.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    state = {"epoch": epoch, "schedule": worker.schedule.state(), "metrics": metrics, "history": worker.history,
             "resumes": worker.resumes, "plan": asdict(worker.plan)}
    with tempfile.TemporaryDirectory(prefix="cxr-ckpt-") as directory:
        save_checkpoint(directory, worker.steps.model, worker.optimizer, state, cfgmod.to_yaml(worker.cfg))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


# ---------------------------------------------------------------------------------------- driver


def fit(cfg: cfgmod.Config, dataset_fn: DatasetFn | None = None, size_fn: SizeFn | None = None,
        counts_fn: CountsFn | None = None) -> dict[str, Any]:
    """Train as `cfg` says on a Ray cluster (started by the caller, or locally by Ray) and summarise."""
    return summarize(run_trainer(cfg, dataset_fn, size_fn, counts_fn))


def run_trainer(cfg: cfgmod.Config, dataset_fn: DatasetFn | None = None, size_fn: SizeFn | None = None,
                counts_fn: CountsFn | None = None, live_tracking: dict[str, str] | None = None,
                plan: Plan | None = None) -> Any:
    """Run Ray Train's TensorflowTrainer for `cfg`; returns Ray's Result (history, checkpoints).

    Re-running with the same `run.storage_path` + `run.name` resumes from the latest checkpoint.
    `live_tracking` ({"uri", "run_id"}) has rank 0 log each epoch into that MLflow run as it ends.
    `plan` is `plan_run`'s, when the caller made it already (to fail before starting Ray).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from cxr import quiet

    source = data_source(dataset_fn, size_fn, counts_fn)
    plan = plan or plan_run(cfg, source)
    storage_path = _absolute(cfg.run.storage_path)
    cfgmod.write_resolved(cfg, storage.join(run_path(cfg), CONFIG_FILE))
    log.info("training %s at %d px on %d worker(s): %d steps/epoch of %d images, %d val images",
             cfg.model.name, cfg.data.image_size, cfg.scaling.num_workers, plan.steps_per_epoch,
             cfg.optim.batch_size * cfg.scaling.num_workers, plan.val_size)
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "plan": plan, "source": source,
                           "tracking": live_tracking},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=cfg.scaling.resources_per_worker),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            # Ray Train's INFO lines repeat every metric of every worker each epoch; cxr prints its own.
            logging_config=LoggingConfig(log_level="INFO" if quiet.verbose() else "WARNING"),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep,
                                               checkpoint_score_attribute=SCORE, checkpoint_score_order="max")),
    )
    return trainer.fit()


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


def summarize(result: Any) -> dict[str, Any]:
    """Latest metrics, best epoch and the paths of the best and latest checkpoints of a Ray Result."""
    best = result.get_best_checkpoint(metric=SCORE, mode="max") if result.best_checkpoints else None
    best_metrics = next((m for c, m in result.best_checkpoints or [] if best and c.path == best.path), {})
    metrics = result.metrics or {}
    return {
        "run_path": result.path,
        "epochs_done": int(metrics.get("epoch", -1)) + 1,
        "stopped_early": bool(metrics.get("stopped_early", False)),
        "best_epoch": best_metrics.get("epoch"),
        "best_val_auroc_mean": best_metrics.get(SCORE),
        "best_checkpoint": best.path if best else None,
        "latest_checkpoint": result.checkpoint.path if result.checkpoint else None,
        "metrics": metrics,
    }


def run_path(cfg: cfgmod.Config) -> str:
    """Where the run's checkpoints live: `run.storage_path`/`run.name`; the run's identity across re-submits."""
    return storage.join(_absolute(cfg.run.storage_path), cfg.run.name)


def _absolute(path: str) -> str:
    """Ray Train wants an absolute local path or a URI."""
    return path if "://" in path else os.path.abspath(path)
