"""`cxr sweep`: many training runs of one question on one Ray cluster (Ray Tune + ASHA), compared in MLflow.

Each trial is a Tune function that builds the cxr training run of the base config plus the trial's sampled
overrides and runs it with `cxr.training.driver.run_trainer`, Ray Train reporting each epoch to Tune through
`TuneReportCallback` (the Train V2 way; `Tuner(trainer)` is deprecated). ASHA stops trials whose validation
mean AUROC trails at its rungs. Checkpoints: `run.storage_path`/<sweep>/trials/trial-<id>; Tune's own state:
`run.storage_path`/<sweep>, so re-submitting the same sweep restores it and does not redo finished trials.
MLflow: a parent run per sweep (the space, the scheduler, `trials.csv`, the best trial) and a child run per trial
(`mlflow.parentRunId`, the per-epoch series of a `cxr train` run, its stop reason). The best trial's checkpoint
is scored and registered by `cxr.workflow.record` (what `cxr train` does), and promoted with `--promote`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

from cxr import config as cfgmod
from cxr import quiet, storage
from cxr import sweep as spacemod
from cxr.cluster import init_ray
from cxr.data import source as sources
from cxr.redact import redact
from cxr.tracking import runs
from cxr.training import driver

log = logging.getLogger(__name__)
PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG, TRIAL_TAG, STOP_TAG, BEST_TAG = "cxr.sweep", "cxr.sweep.trial", "cxr.sweep.stop_reason", "cxr.sweep.best"
COLUMNS = ("trial", "status", "best_val_metric", "epochs_run", "stop_reason")


def sweep_name(base: cfgmod.Config, space: spacemod.Space) -> str:
    return space.name or f"{base.run.name}-sweep"


def trial_config(base: dict[str, Any], params: dict[str, Any], trials_path: str, trial: str) -> cfgmod.Config:
    """The trial's training run: the base config, the sampled values, its own name under the sweep's folder."""
    fixed = [f"run.storage_path={trials_path}", f"run.name={trial}", f"tracking.run_name={trial}"]
    return cfgmod.with_absolute_paths(cfgmod.validate(cfgmod.apply_overrides(
        base, spacemod.overrides(params) + fixed), source=f"trial {trial}"))


def _trial(params: dict[str, Any], ctx: dict[str, Any]) -> None:
    """Tune's function for one trial: a cxr training run whose epochs Ray Train reports to Tune; stopped by
    ASHA, its Train run is aborted (`cxr.training.trial`) and its child run ends FINISHED."""
    from ray import tune

    from cxr.tracking.handlers import EpochLogger
    from cxr.training.trial import fit_until_stopped

    trial = f"trial-{tune.get_context().get_trial_id()}"
    cfg = trial_config(ctx["base"], params, ctx["trials_path"], trial)
    source = sources.for_config(cfg.data)
    plan = driver.plan_run(cfg, source)
    uri = ctx["uri"]
    tags = {**runs.run_tags(cfg, sources.fingerprint(cfg.data)), PARENT_TAG: ctx["parent"],
            SWEEP_TAG: ctx["sweep"], TRIAL_TAG: trial}
    run_id = runs.open_run(uri, cfg.tracking.experiment, f"{ctx['sweep']}/{trial}", redact(driver.run_path(cfg)),
                           runs.safe_params(cfg.model_dump(mode="json")),
                           runs.artifact_location(uri, cfg.tracking.artifact_location), tags)
    try:
        fit_until_stopped(lambda run_callbacks: driver.run_trainer(
            cfg, source, plan, callbacks=[EpochLogger(uri, run_id)], run_callbacks=run_callbacks),
            then=lambda: runs.end_run(uri, run_id, "FINISHED"))
    except Exception as exc:
        from mlflow.tracking import MlflowClient

        MlflowClient(uri).set_tag(run_id, STOP_TAG, f"failed: {redact(str(exc)).splitlines()[0][:300]}")
        runs.end_run(uri, run_id, "FAILED")
        raise


def max_concurrent(cfg: cfgmod.Config, nodes: list[dict[str, float]] | None = None) -> int:
    """How many trials the cluster's resources (`nodes`, default: Ray's live nodes) hold at once, each needing
    `scaling.num_workers` workers; at least one (Tune then waits, as `cxr train` would, for an autoscaler)."""
    if nodes is None:
        import ray

        nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]
    return max(1, driver.workers_that_fit(driver.worker_resources(cfg), nodes) // cfg.scaling.num_workers)


def run(config_url: str, space_url: str, overrides: Sequence[str] = (), trials: int | None = None,
        concurrent: int | None = None, promote: bool = False) -> dict[str, Any]:
    """Check the space, run (or restore) the sweep, record it in MLflow, register the best trial's model."""
    base = cfgmod.with_absolute_paths(cfgmod.load(config_url, overrides))
    raw = base.model_dump(mode="json")  # absolute paths: trials run in Ray's working directories
    space = spacemod.load(space_url, raw, trials)  # bad keys and ranges fail here, before Ray
    name = sweep_name(base, space)
    root = storage.join(base.run.storage_path, name)
    plan_source = sources.for_config(base.data)
    driver.plan_run(base, plan_source)
    init_ray()
    driver.require_resources(base, not os.environ.get("RAY_ADDRESS"))
    uri = base.tracking.tracking_uri or runs.default_uri(".")
    parent = runs.open_run(uri, base.tracking.experiment, name, redact(root),
                           {**space.params(), **runs.safe_params(base.model_dump(mode="json"))},
                           runs.artifact_location(uri, base.tracking.artifact_location),
                           {SWEEP_TAG: name, "cxr.sweep.space_file": redact(space_url)})
    limit = concurrent or max_concurrent(base)
    log.info("sweep %s: %d sample(s) of %s, up to %d at once; MLflow parent run %s", name, space.trials,
             ", ".join(d.key for d in space.dimensions), limit, parent)
    ctx = {"base": raw, "trials_path": storage.join(root, "trials"), "uri": uri, "parent": parent, "sweep": name}
    try:
        grid = _tuner(base, space, name, ctx, limit, root).fit()
        table = _table(grid, space.metric, base.optim.epochs)
        out = _record(base, ctx, table, uri, parent, promote)
    except BaseException:
        runs.end_run(uri, parent, "FAILED")
        raise
    runs.end_run(uri, parent, "FINISHED")
    return {**out, "sweep": name, "parent_run_id": parent, "trials": table, "max_concurrent": limit,
            "tracking_uri": redact(uri), "experiment": base.tracking.experiment}


def _tuner(base: cfgmod.Config, space: spacemod.Space, name: str, ctx: dict[str, Any], limit: int,
           root: str) -> Any:
    """A new Tuner, or the sweep's own restored (finished trials stay finished, failed ones stay failed)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    # The trial function only drives Ray Train, whose workers book their own resources (their own placement
    # group: Train V2 cannot nest it in the trial's): it books no CPU (Tune refuses an empty bundle, hence a
    # token of memory), so a trial and its workers do not book the same CPUs twice; `limit` keeps Tune from
    # starting more trials than the workers' CPUs hold.
    # A trial Tune stops aborts its Train run in its cleanup (cxr.training.trial), so the workers' CPUs are free
    # before the trial's actor goes. Should that hang, Tune kills the actor after TUNE_FORCE_TRIAL_CLEANUP_S and
    # Ray Train's placement-group cleaner is left to free them.
    from cxr.training.trial import stoppable

    trainable = tune.with_resources(stoppable(tune.with_parameters(_trial, ctx=ctx)), {"CPU": 0, "memory": 2**20})
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", "90")
    path = root if "://" in root else os.path.abspath(root)
    if tune.Tuner.can_restore(path):
        log.warning("sweep %s exists at %s: restoring it (finished trials are not run again)", name, redact(path))
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False)
    # stop_last_trials=False: ASHA would otherwise stop every trial at its last epoch's report, before its fit()
    # returns, so the Train run would be aborted instead of ending (and removing its workers) on its own.
    scheduler = ASHAScheduler(time_attr="epoch", max_t=base.optim.epochs, grace_period=space.grace_period,
                              reduction_factor=space.reduction_factor, stop_last_trials=False)
    return tune.Tuner(trainable, param_space=space.tune_space(),
                      tune_config=tune.TuneConfig(metric=space.metric, mode="max", num_samples=space.trials,
                                                  scheduler=scheduler, max_concurrent_trials=limit),
                      run_config=tune.RunConfig(name=name, storage_path=os.path.dirname(path),
                                                failure_config=tune.FailureConfig(max_failures=0),
                                                verbose=2 if quiet.verbose() else 0))


def _table(grid: Any, metric: str, epochs: int) -> list[dict[str, Any]]:
    """One row per trial: its params, best metric, epochs run and why it stopped."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or _trial_id(result.path)
        frame = result.metrics_dataframe
        scores = [] if frame is None or metric not in frame else [float(v) for v in frame[metric] if v == v]
        done = int(metrics.get("epoch", 0) or 0)
        if result.error is not None:
            status, reason = "FAILED", f"failed at epoch {done + 1}: {_first_line(result.error)}"
        elif metrics.get("stopped_early"):
            status, reason = "FINISHED", f"early stopping (optim.early_stopping_patience) at epoch {done}"
        elif done < epochs:
            status, reason = "FINISHED", f"stopped by ASHA at epoch {done}"
        else:
            status, reason = "FINISHED", f"completed {done} epochs"
        rows.append({"trial": f"trial-{trial_id}", "status": status,
                     "best_val_metric": max(scores) if scores else math.nan, "epochs_run": done,
                     "stop_reason": reason, "params": _params(result)})
    return sorted(rows, key=lambda r: r["trial"])


def _params(result: Any) -> dict[str, Any]:
    """A trial's sampled values (a restored failed trial's Result has none: Tune's params.json has them)."""
    config = result.config
    if not config:
        url = storage.join(result.path, "params.json")
        config = json.loads(storage.read_text(url)) if storage.exists(url) else {}
    return {k: spacemod._plain(v) for k, v in config.items()}


def _trial_id(path: str) -> str:
    """A Tune trial folder's trial id (`_trial_<id>_<n>_…` → `<id>_<n>`), for trials that reported nothing."""
    parts = os.path.basename(path.rstrip("/")).split("_")
    i = next((i for i, p in enumerate(parts) if len(p) == 5 and i + 1 < len(parts) and parts[i + 1].isdigit()), 0)
    return "_".join(parts[i:i + 2])


def _first_line(error: BaseException) -> str:
    text = redact(str(error)).strip().splitlines()
    return next((t.strip() for t in reversed(text) if "Error" in t), text[-1] if text else type(error).__name__)[:300]


def _record(base: cfgmod.Config, ctx: dict[str, Any], table: list[dict[str, Any]], uri: str, parent: str,
            promote: bool) -> dict[str, Any]:
    """Children's status and stop reason, trials.csv on the parent, the best trial scored and registered."""
    from mlflow.tracking import MlflowClient

    from cxr import workflow

    client = MlflowClient(uri)
    children = {r.data.tags.get(TRIAL_TAG): r for r in client.search_runs(
        [client.get_run(parent).info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")}
    for row in table:
        child = children.get(row["trial"])
        row["mlflow_run_id"] = child.info.run_id if child else ""
        if child is not None:
            client.set_tag(child.info.run_id, STOP_TAG, row["stop_reason"])
            _backfill(client, child.info.run_id, ctx, row)
            if child.info.status != "FINISHED" and row["status"] == "FINISHED":
                # a trial whose actor was killed before it could end its run (an abort that hung; see _tuner)
                client.set_terminated(child.info.run_id, "FINISHED")
    client.log_text(parent, _csv(table), "trials.csv")
    ranked = [r for r in table if r["status"] == "FINISHED" and math.isfinite(r["best_val_metric"])]
    if not ranked:
        return {"best_trial": None, "model_version": None}
    best = max(ranked, key=lambda r: r["best_val_metric"])
    client.set_tag(parent, BEST_TAG, best["trial"])
    client.log_metric(parent, "best_val_metric", best["best_val_metric"])
    prior = client.get_run(parent).data.tags
    if prior.get("cxr.sweep.best_registered") == best["trial"] and prior.get("cxr.sweep.model_version"):
        log.warning("sweep: best trial %s already registered as version %s", best["trial"],
                    prior["cxr.sweep.model_version"])
        return {"best_trial": best["trial"], "model_version": prior["cxr.sweep.model_version"],
                "already_registered": True}
    cfg = trial_config(ctx["base"], best["params"], ctx["trials_path"], best["trial"])
    out = workflow.record(cfg, driver.result_at(driver.run_path(cfg)), uri, best["mlflow_run_id"], promote)
    client.set_tag(parent, "cxr.sweep.best_registered", best["trial"])
    client.set_tag(parent, "cxr.sweep.model_version", str(out.get("model_version")))
    return {"best_trial": best["trial"], "model_version": out.get("model_version"), "best": out}


def _backfill(client: Any, run_id: str, ctx: dict[str, Any], row: dict[str, Any]) -> None:
    """Epochs a child lacks, from its checkpointed history: ASHA can stop a trial before rank 0 logs its last."""
    from cxr.training import checkpoints

    path = driver.run_path(trial_config(ctx["base"], row["params"], ctx["trials_path"], row["trial"]))
    try:
        latest = driver.result_at(path).checkpoint
    except RuntimeError:  # no checkpoint: the trial failed in its first epoch
        return
    runs.log_missing_epochs(client, run_id, checkpoints.history(latest))


def _csv(table: list[dict[str, Any]]) -> str:
    """trials.csv: one row per trial, a column per swept key (what a parallel-coordinates plot wants)."""
    keys = sorted({k for r in table for k in r["params"]})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*COLUMNS[:1], *keys, *COLUMNS[1:], "mlflow_run_id"])
    for r in table:
        writer.writerow([r["trial"], *(r["params"].get(k, "") for k in keys), r["status"],
                         "" if not math.isfinite(r["best_val_metric"]) else f"{r['best_val_metric']:.4f}",
                         r["epochs_run"], r["stop_reason"], r.get("mlflow_run_id", "")])
    return buf.getvalue()


def summary_text(out: dict[str, Any]) -> str:
    """What `cxr sweep` prints: the trials' table, the best, where to look."""
    lines = [f"sweep {out['sweep']}: {len(out['trials'])} trial(s), up to {out['max_concurrent']} at once",
             f"{'trial':<20} {'best val':>9} {'epochs':>6}  stop reason  params"]
    for r in out["trials"]:
        score = "-" if not math.isfinite(r["best_val_metric"]) else f"{r['best_val_metric']:.4f}"
        params = " ".join(f"{k}={v}" for k, v in sorted(r["params"].items()))
        lines.append(f"{r['trial']:<20} {score:>9} {r['epochs_run']:>6}  {r['stop_reason']}  {params}")
    if out.get("best_trial"):
        lines.append(f"best: {out['best_trial']}, registered as version {out.get('model_version')}"
                     + (" (already)" if out.get("already_registered") else ""))
    decision = (out.get("best") or {}).get("decision")
    if decision:
        lines.append(decision)
    lines.append(f"MLflow: experiment {out['experiment']} at {out['tracking_uri']}, parent run {out['parent_run_id']}")
    return "\n".join(lines)

