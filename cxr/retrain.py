"""The scheduled unit of work: (prepare) → train a challenger → evaluate → promote, named by its date slot.

A schedule runs `cxr retrain` (or `jobs/retrain.py`) every period. The run is named `<run.name>-<slot>` (the
slot defaults to today's UTC date), so re-submitting the same slot resumes that run instead of starting
another, and a finished slot does nothing. With `--prepare DATA_ROOT OUT_URI` the data is prepared first;
shards already committed and still planned as they are are kept. The new model version is evaluated and
promoted by `cxr promote`'s rules; a failure anywhere leaves `@champion` where it was (aliases move last).
The outcome is one line and an exit status: 0 promoted, 0 kept champion (with why), 1 failed (with why).
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

from cxr import config as cfgmod
from cxr.redact import redact

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    slot: str
    status: str  # "promoted", "kept champion", "already done" or "failed"
    line: str
    details: str = ""

    @property
    def exit_code(self) -> int:
        return 1 if self.status == "failed" else 0


def retrain(cfg: cfgmod.Config, slot: str | None = None, prepare: tuple[str, str] | None = None,
            prepare_params: dict | None = None) -> Outcome:
    """Run one slot; every failure is caught and reported as the outcome (a schedule reads the exit status)."""
    slot = slot or datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    try:
        return _retrain(cfg, slot, prepare, prepare_params or {})
    except Exception as exc:  # noqa: BLE001 - the outcome says what failed; the champion was not touched
        log.exception("retrain %s failed", slot)
        reason = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        return Outcome(slot, "failed", f"retrain {slot}: failed ({type(exc).__name__}: {reason}); the champion "
                       "is unchanged")


def _retrain(cfg: cfgmod.Config, slot: str, prepare: tuple[str, str] | None, prepare_params: dict) -> Outcome:
    from cxr import workflow

    if prepare is not None:
        from cxr.data.prepare import prepare as run_prepare
        from cxr.data.shards import Params

        root, out = prepare
        summary = run_prepare(root, out, Params(**prepare_params), progress=False)
        log.info("prepared %s: %d new shards, %d kept", redact(out), summary["shards_written"], summary["shards_kept"])
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"manifest_uri": summary["manifest"],
                                                                          "source": "shards"})})
    name = f"{cfg.run.name}-{slot}"
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
