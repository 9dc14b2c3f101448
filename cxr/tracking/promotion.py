"""`cxr promote`: a candidate replaces the champion only if it is better on the same patients, with confidence.

Both models are scored on the same test images (the data's fingerprint is checked against what the candidate
was evaluated on), and their mean AUROCs are compared with a paired bootstrap over patients: the candidate is
promoted only if the lower bound of the gain's confidence interval is above `min_gain`, and no finding drops
by more than `max_drop` (a retrain must not trade one finding for the mean). The first registered model becomes
champion without a comparison. The decision, both scores, the difference and its interval and the fingerprint
are tagged on the candidate's version; the replaced champion stays reachable as `@previous`. Nothing moves
unless every step before it succeeded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from cxr.evaluation.bootstrap import paired_difference
from cxr.redact import redact
from cxr.tracking import registry

log = logging.getLogger(__name__)


class PromotionError(ValueError):
    """The comparison cannot be made as asked (other data, no such version); nothing was changed."""


@dataclass
class Decision:
    name: str
    candidate: str
    champion: str | None
    promoted: bool
    reasons: list[str]
    data: str
    fingerprint: str
    comparison: dict[str, Any] | None = None  # the paired bootstrap, JSON-safe
    scores: dict[str, float | None] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return "promoted" if self.promoted else "kept champion"

    def explain(self) -> str:
        """A screenful a reviewer can read: what was compared, on what, and why it went this way."""
        head = f"{self.name}: version {self.candidate} vs champion " + (f"version {self.champion}" if self.champion
                                                                         else "(none)")
        lines = [head, f"  data: {self.data} (fingerprint {self.fingerprint[:16]}…)"]
        if self.comparison is not None:
            m = self.comparison["mean"]
            pct = f"{100 * self.comparison['confidence']:.0f}%"
            lines.append(f"  mean AUROC: champion {m['a']:.4f}, candidate {m['b']:.4f}, difference "
                         f"{m['difference']:+.4f} [{pct} CI {m['low']:+.4f}, {m['high']:+.4f}] "
                         f"({self.comparison['resamples']} paired resamples of patients)")
            worst = sorted(((v["difference"], k) for k, v in self.comparison["findings"].items()
                            if v["difference"] is not None))[:3]
            lines.append("  largest drops: " + ", ".join(f"{k} {d:+.4f}" for d, k in worst))
        lines.append(f"  decision: {self.verdict.upper()}")
        lines += [f"    - {r}" for r in self.reasons]
        return "\n".join(lines)


def promote(name: str, candidate: str, tracking_uri: str | None = None, data_uri: str | None = None,
            min_gain: float = 0.0, max_drop: float = 0.02, confidence: float = 0.95, resamples: int = 2000,
            seed: int = 0, batch_size: int = 64, dry_run: bool = False) -> Decision:
    """Decide and, unless `dry_run`, act: move `@champion` to the candidate or leave it, tagging the decision."""
    from mlflow.tracking import MlflowClient

    from cxr.evaluation.evaluate import evaluate

    client = MlflowClient(tracking_uri)
    cand = registry.get(client, name, candidate)
    champ = registry.alias(client, name, registry.CHAMPION)
    run_tags = client.get_run(cand.run_id).data.tags
    data_uri = data_uri or run_tags.get("cxr.data")
    if not data_uri:
        raise PromotionError(f"{name} version {cand.version}: no --data given and its run does not name its data")
    evaluated = cand.tags.get("test_fingerprint")
    if champ is None or champ.version == cand.version:
        fingerprint = evaluated or ""
        reason = "the first registered model becomes champion" if champ is None else "already the champion"
        decision = Decision(name, cand.version, None if champ is None else champ.version, champ is None, [reason],
                            redact(data_uri), fingerprint)
        return _act(client, decision, cand, champ, dry_run)
    ev_cand = evaluate(cand.uri, data_uri, tracking_uri=tracking_uri, resamples=resamples, confidence=confidence,
                       seed=seed, batch_size=batch_size, record=False)
    fingerprint = ev_cand.report["data"]["fingerprint"]
    if evaluated and evaluated != fingerprint:
        raise PromotionError(
            f"{name} version {cand.version} was evaluated on data with fingerprint {evaluated[:16]}…, but "
            f"{redact(data_uri)} has fingerprint {fingerprint[:16]}…: the comparison would not be on the images its "
            f"report describes. Evaluate it on this data first (cxr evaluate --model {cand.uri} --data URI)")
    ev_champ = evaluate(champ.uri, data_uri, tracking_uri=tracking_uri, resamples=resamples, confidence=confidence,
                        seed=seed, batch_size=batch_size, record=False)
    a, b = ev_champ.predictions, ev_cand.predictions
    if ev_champ.report["data"]["fingerprint"] != fingerprint or (a.seen != b.seen).any():
        raise PromotionError("the champion and the candidate were not scored on the same images")
    probs_a, labels = a.present()
    probs_b, _ = b.present()
    paired = paired_difference(labels, probs_a, probs_b, ev_cand.patients, resamples=resamples,
                               confidence=confidence, seed=seed, names=list(ev_cand.report["auroc"]["findings"]))
    reasons = paired.failures(min_gain, max_drop)
    promoted = not reasons
    if promoted:
        reasons = [f"mean-AUROC gain lower bound {paired.low:+.4f} is above {min_gain:+.4f}, and no finding drops by "
                   f"more than {max_drop:.4f}"]
    decision = Decision(name, cand.version, champ.version, promoted, reasons, redact(data_uri), fingerprint,
                        paired.to_dict(), {"champion": paired.a, "candidate": paired.b})
    return _act(client, decision, cand, champ, dry_run)


def _act(client: Any, decision: Decision, cand: registry.Version, champ: registry.Version | None,
         dry_run: bool) -> Decision:
    """Tag the decision on the candidate, then move the aliases if promoted (tags first: an alias never moves
    without its reason on record)."""
    if dry_run:
        return decision
    m = (decision.comparison or {}).get("mean", {})
    registry.tag(client, decision.name, cand.version, {
        "cxr.decision": decision.verdict, "cxr.decision.reasons": "; ".join(decision.reasons),
        "cxr.decision.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cxr.decision.champion_version": decision.champion, "cxr.decision.fingerprint": decision.fingerprint,
        "cxr.decision.champion_auroc_mean": m.get("a"), "cxr.decision.candidate_auroc_mean": m.get("b"),
        "cxr.decision.difference": m.get("difference"), "cxr.decision.ci_low": m.get("low"),
        "cxr.decision.ci_high": m.get("high")})
    if decision.promoted and (champ is None or champ.version != cand.version):
        registry.crown(client, decision.name, cand.version, champ)
        if champ:  # a first champion is said by the decision itself
            log.info("%s: version %s is the champion (version %s is @previous)", decision.name, cand.version,
                     champ.version)
    return decision
