"""The scheduled unit of work: (prepare) → train a challenger → evaluate → promote, named by its date slot.

A schedule runs `cxr retrain` (or `jobs/retrain.py`) every period. The run is named `<run.name>-<slot>` (the
slot defaults to today's UTC date), so re-submitting the same slot resumes that run instead of starting
another, and a finished slot does nothing. `--slot` also takes the name of the RayJob a scheduler made, which
survives KubeRay's retries: NAME-YYYY-MM-DD (the CronJob's) or NAME-<minutes since the epoch> (a RayCronJob's:
its schedule time, the slot is that minute's UTC date). One round of a slot runs at a time: a round holds the
slot's lease (cxr/lease.py) and a second one exits with "slot S is already running". With `--prepare DATA_ROOT
OUT_URI` the data is prepared first; shards already committed and still planned as they are are kept. The
new model version is evaluated and promoted by `cxr promote`'s rules; a failure anywhere leaves `@champion`
where it was (aliases move last). The outcome is one line and an exit status: 0 promoted, 0 kept champion
(with why), 1 failed (with why) or already running.
"""

from __future__ import annotations

import datetime
import logging
import re
from dataclasses import dataclass

from cxr import config as cfgmod
from cxr.lease import LeaseLost, SlotBusy, SlotLease, lease_url
from cxr.redact import redact

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    slot: str
    status: str  # "promoted", "kept champion", "already done", "already running" or "failed"
    line: str
    details: str = ""

    @property
    def exit_code(self) -> int:
        return 1 if self.status in ("failed", "already running") else 0


FIRST_MINUTE = 26_000_000  # 2019-06-08 in minutes since the epoch: smaller numbers are no RayCronJob tick


def resolve_slot(value: str | None, now: datetime.datetime | None = None) -> str:
    """The slot (YYYY-MM-DD) of `value`: a date, a scheduled RayJob's name, or nothing (today, UTC)."""
    if not value:
        return (now or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%d")
    dated = re.fullmatch(r"(?:.*-)?(\d{4}-\d{2}-\d{2})", value)
    if dated:
        try:
            datetime.date.fromisoformat(dated.group(1))
        except ValueError as exc:
            raise ValueError(f"slot {value!r}: {dated.group(1)} is not a date ({exc})") from None
        return dated.group(1)
    ticked = re.fullmatch(r".+-(\d+)", value)
    if ticked and int(ticked.group(1)) >= FIRST_MINUTE:
        return datetime.datetime.fromtimestamp(int(ticked.group(1)) * 60, datetime.UTC).strftime("%Y-%m-%d")
    raise ValueError(f"slot {value!r} is neither YYYY-MM-DD nor a scheduled RayJob's name (NAME-YYYY-MM-DD, "
                     "NAME-<minutes since the epoch>)")


def retrain(cfg: cfgmod.Config, slot: str | None = None, prepare: tuple[str, str] | None = None,
            prepare_params: dict | None = None) -> Outcome:
    """Run one slot; every failure is caught and reported as the outcome (a schedule reads the exit status)."""
    try:
        slot = resolve_slot(slot)
    except ValueError as exc:
        return Outcome(str(slot), "failed", f"retrain {slot}: failed ({exc}); nothing was done")
    try:
        return _retrain(cfg, slot, prepare, prepare_params or {})
    except SlotBusy as exc:
        return Outcome(slot, "already running", f"retrain {slot}: {exc}; this round did nothing")
    except Exception as exc:  # noqa: BLE001 - the outcome says what failed; the champion was not touched
        log.exception("retrain %s failed", slot)
        reason = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        return Outcome(slot, "failed", f"retrain {slot}: failed ({type(exc).__name__}: {reason}); the champion "
                       "is unchanged")


def _retrain(cfg: cfgmod.Config, slot: str, prepare: tuple[str, str] | None, prepare_params: dict) -> Outcome:
    name = f"{cfg.run.name}-{slot}"
    lease = SlotLease(lease_url(cfg.run.storage_path, name), slot)
    lease.acquire()  # before prepare: two rounds of a slot would also write the same shards
    try:
        with lease:
            return _round(cfg, slot, name, prepare, prepare_params)
    except KeyboardInterrupt:
        if lease.lost:
            raise LeaseLost(f"slot {slot}: another round took over the lease (this one could not renew it)") from None
        raise


def _round(cfg: cfgmod.Config, slot: str, name: str, prepare: tuple[str, str] | None,
           prepare_params: dict) -> Outcome:
    from cxr import workflow

    if prepare is not None:
        from cxr.data.prepare import prepare as run_prepare
        from cxr.data.shards import Params

        root, out = prepare
        summary = run_prepare(root, out, Params(**prepare_params), progress=False, dataset=cfg.data.dataset)
        log.info("prepared %s: %d new shards, %d kept", redact(out), summary["shards_written"], summary["shards_kept"])
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"manifest_uri": summary["manifest"],
                                                                          "source": "shards"})})
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": name})})
    s = workflow.run(cfg, promote=True)
    model = f"{s.get('model_name')} version {s.get('model_version')}"
    if s.get("already_finished"):
        return Outcome(slot, "already done", f"retrain {slot}: already done ({model}); nothing to train")
    decision = s.get("promotion")
    if decision is None:
        raise RuntimeError(f"run {name} registered no model version, so there is nothing to promote")
    why = decision.reasons[0] if decision.reasons else ""
    mean = s["test"]["mean"]
    score = "undefined" if mean is None else f"{mean:.4f}"
    return Outcome(slot, decision.verdict, f"retrain {slot}: {decision.verdict} ({model}, test mean AUROC {score}): "
                   f"{why}", s["decision"])
