"""`cxr promote`: a candidate replaces the champion only if it is better on patients neither has seen, with confidence.

Both models are scored on the candidate's test split (the data's fingerprint is checked against what the
candidate was evaluated on; a raw root is split as the candidate's run split it, each model's images sized as
it was trained), minus every patient the champion (or the candidate) trained or was validated on, read from
the runs' provenance records: a re-prepared root without official lists reshuffles its split, and a champion
scored on its own training patients would look better than it is. Too few patients left is an error, not a
decision. Mean AUROCs are compared with a paired bootstrap over patients: the candidate is promoted only if
the gain's interval lies above `min_gain` and no finding is shown to drop by more than `max_drop`, with
familywise confidence over the findings (docs/promotion.md).

The decision is tagged on the candidate's version and the aliases move under the registry's lock, after
re-reading `@champion`: if another promotion moved it meanwhile, the candidate is compared again with the new
champion. The first model becomes champion (if it reaches `min_auroc`, when one is set); promoting the
champion itself changes nothing. The replaced champion stays reachable as `@previous`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxr.evaluation.bootstrap import paired_difference
from cxr.redact import redact
from cxr.tracking import provenance, registry

log = logging.getLogger(__name__)
ATTEMPTS = 3  # comparisons against a champion that keeps moving before giving up


class PromotionError(ValueError):
    """The comparison cannot be made as asked (other data, too few unseen patients); nothing was changed."""


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
    unchanged: bool = False  # the candidate already is the champion: nothing to decide or record
    first: bool = False  # no champion existed
    patients: dict[str, int] = field(default_factory=dict)  # test, excluded (seen in training), scored
    champion_fingerprint: str | None = None  # the data the champion trained on

    @property
    def verdict(self) -> str:
        if self.unchanged:
            return "already champion"
        return "promoted" if self.promoted else "kept champion"

    def explain(self) -> str:
        """A screenful a reviewer can read: what was compared, on what, and why it went this way."""
        head = f"{self.name}: version {self.candidate} vs champion " + (f"version {self.champion}" if self.champion
                                                                         else "(none)")
        lines = [head, f"  data: {self.data} (fingerprint {self.fingerprint[:16]}…)" if self.fingerprint else
                 f"  data: {self.data}"]
        if self.patients:
            p = self.patients
            lines.append(f"  patients: {p['scored']} of {p['test']} test patients scored; {p['excluded']} excluded "
                         "as seen in training or validation")
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


@dataclass
class _Scorer:
    """Evaluations on the candidate's split, each model predicted at most once (a re-decision reuses them), and
    not at all when its run saved predictions made under exactly these settings (`cxr.evaluation.saved`)."""

    data_uri: str
    split_tags: dict[str, str]
    options: dict[str, Any]
    done: dict[str, Any] = field(default_factory=dict)

    def __call__(self, version: registry.Version) -> Any:
        from cxr.evaluation.evaluate import evaluate

        if version.uri not in self.done:
            self.done[version.uri] = evaluate(version.uri, self.data_uri, val_split=None, record=False,
                                              split_tags=self.split_tags, reuse=True, subgroup_attributes=(),
                                              **self.options)
        return self.done[version.uri]


def promote(name: str, candidate: str, tracking_uri: str | None = None, data_uri: str | None = None,
            min_gain: float = 0.0, max_drop: float = 0.02, confidence: float = 0.95, resamples: int = 2000,
            seed: int = 0, batch_size: int = 64, dry_run: bool = False, min_unseen: float = 0.5,
            min_auroc: float | None = None) -> Decision:
    """Decide and, unless `dry_run`, act: move `@champion` to the candidate or leave it, tagging the decision."""
    from mlflow.tracking import MlflowClient

    if not 0.0 <= min_unseen <= 1.0:
        raise PromotionError(f"min_unseen must be a fraction in [0, 1], got {min_unseen}")
    client = MlflowClient(tracking_uri)
    cand = registry.get(client, name, candidate)
    cand_tags = client.get_run(cand.run_id).data.tags
    data_uri = data_uri or cand_tags.get("cxr.data")
    if not data_uri:
        raise PromotionError(f"{name} version {cand.version}: no --data given and its run does not name its data")
    score = _Scorer(data_uri, cand_tags, {"tracking_uri": tracking_uri, "resamples": resamples,
                                          "confidence": confidence, "seed": seed, "batch_size": batch_size})
    rules = {"min_gain": min_gain, "max_drop": max_drop, "min_unseen": min_unseen, "min_auroc": min_auroc}
    champ = registry.alias(client, name, registry.CHAMPION)
    moves: list[str] = []
    for _ in range(ATTEMPTS):
        decision = _decide(client, score, cand, champ, rules)
        decision.reasons += moves
        if dry_run or decision.unchanged:
            return decision
        holder = f"promotion of {name} version {cand.version} by {socket.gethostname()} pid {os.getpid()}"
        with registry.lock(client, name, holder):
            now = registry.alias(client, name, registry.CHAMPION)
            if (now and now.version) == (champ and champ.version):
                return _act(client, decision, cand, champ)
        moved = (f"@champion moved from version {champ.version if champ else '(none)'} to "
                 f"{now.version if now else '(none)'} while deciding; decided again against it")
        log.warning("%s: %s", name, moved)
        moves.append(moved)
        champ = now
    raise PromotionError(f"{name}: @champion moved {ATTEMPTS} times while version {cand.version} was being compared "
                         "(other promotions running); nothing was changed: promote it again later")


def _decide(client: Any, score: _Scorer, cand: registry.Version, champ: registry.Version | None,
            rules: dict[str, Any]) -> Decision:
    name, data = cand.name, redact(score.data_uri)
    if champ is not None and champ.version == cand.version:
        return Decision(name, cand.version, champ.version, False, ["it already is the champion: nothing changed"],
                        data, "", unchanged=True)
    if champ is None and rules["min_auroc"] is None:  # nothing to compare or check: no evaluation needed
        return _first(cand, None, data, cand.tags.get("test_fingerprint", ""), None)
    ev_cand = score(cand)
    fingerprint = ev_cand.report["data"]["fingerprint"]
    evaluated = cand.tags.get("test_fingerprint")
    if evaluated and evaluated != fingerprint:
        raise PromotionError(
            f"{name} version {cand.version} was evaluated on data with fingerprint {evaluated[:16]}…, but "
            f"{data} has fingerprint {fingerprint[:16]}…: the comparison would not be on the images its "
            f"report describes. Evaluate it on this data first (cxr evaluate --model {cand.uri} --data URI)")
    if champ is None:
        return _first(cand, ev_cand, data, fingerprint, rules["min_auroc"])
    ev_champ = score(champ)
    _check_aligned(ev_champ, ev_cand, name, champ, cand)
    keep, counts, champ_fp = _unseen(client, ev_cand, cand, champ, fingerprint, data, rules["min_unseen"])
    probs_a, labels = ev_champ.present()
    probs_b, _ = ev_cand.present()
    paired = paired_difference(labels[keep], probs_a[keep], probs_b[keep], ev_cand.patients[keep],
                               resamples=ev_cand.ci.resamples, confidence=ev_cand.ci.confidence,
                               seed=ev_cand.ci.seed, names=list(ev_cand.report["auroc"]["findings"]))
    reasons = paired.failures(rules["min_gain"], rules["max_drop"])
    promoted = not reasons
    if promoted:  # what was established, and drops the evidence could not show either way
        reasons = [paired.passed(rules["min_gain"], rules["max_drop"])]
    reasons.append(f"scored on {counts['scored']} of {counts['test']} test patients: {counts['excluded']} excluded "
                   "as seen by a model in training or validation")
    return Decision(name, cand.version, champ.version, promoted, reasons, data, fingerprint, paired.to_dict(),
                    {"champion": paired.a, "candidate": paired.b}, patients=counts, champion_fingerprint=champ_fp)


def _first(cand: registry.Version, ev: Any, data: str, fingerprint: str, min_auroc: float | None) -> Decision:
    """The first model: champion without a comparison, unless it misses the optional floor (`ev` scored it)."""
    mean = None if ev is None else ev.report["auroc"]["mean"]["auroc"]
    promoted, reasons = True, ["the first registered model becomes champion (there is no champion to compare with)"]
    if min_auroc is not None:
        if mean is None or not mean >= min_auroc:
            promoted = False
            reasons = [f"the first model's test mean AUROC {mean if mean is None else f'{mean:.4f}'} is below the "
                       f"floor {min_auroc:.4f}: no champion is set"]
        else:
            reasons.append(f"its test mean AUROC {mean:.4f} reaches the floor {min_auroc:.4f}")
    return Decision(cand.name, cand.version, None, promoted, reasons, data, fingerprint, first=True,
                    scores={"candidate": mean})


def _check_aligned(ev_a: Any, ev_b: Any, name: str, champ: registry.Version, cand: registry.Version) -> None:
    """The two evaluations must be of the same images, row for row, or the paired comparison means nothing."""
    names_a, names_b = tuple(ev_a.report["auroc"]["findings"]), tuple(ev_b.report["auroc"]["findings"])
    if names_a != names_b:
        raise PromotionError(f"{name}: champion version {champ.version} scores {', '.join(names_a)} and candidate "
                             f"version {cand.version} scores {', '.join(names_b)}: models of different label sets "
                             "are not compared finding by finding; nothing was changed")
    a, b = ev_a.predictions, ev_b.predictions
    same = (ev_a.report["data"]["fingerprint"] == ev_b.report["data"]["fingerprint"] and a.seen.shape == b.seen.shape
            and bool((a.seen == b.seen).all()) and np.array_equal(a.labels, b.labels)
            and np.array_equal(ev_a.patients, ev_b.patients))
    if not same:
        raise PromotionError(f"{name}: champion version {champ.version} and candidate version {cand.version} were not "
                             f"scored on the same images ({a.seen.sum()} and {b.seen.sum()} images read of "
                             f"{a.seen.size} and {b.seen.size}); nothing was changed")


def _unseen(client: Any, ev: Any, cand: registry.Version, champ: registry.Version, fingerprint: str, data: str,
            min_unseen: float) -> tuple[np.ndarray, dict[str, int], str | None]:
    """Which test images belong to patients neither model trained or was validated on, and how many patients."""
    from cxr.data.source import SPLIT_TAGS

    champ_learned = provenance.learned_from(client, champ.run_id)
    cand_learned = provenance.learned_from(client, cand.run_id)
    champ_tags = client.get_run(champ.run_id).data.tags
    champ_fp = champ_learned.fingerprint if champ_learned else champ_tags.get("cxr.data.fingerprint")
    seen: set[int] = set()
    if champ_learned is not None:
        seen |= champ_learned.seen
    else:  # trained before runs recorded their patients: only the very same data and split is safe
        cand_tags = client.get_run(cand.run_id).data.tags
        if champ_fp != fingerprint or any(champ_tags.get(k) != cand_tags.get(k) for k in SPLIT_TAGS):
            raise PromotionError(
                f"{cand.name}: champion version {champ.version} recorded no training patients and was trained on "
                f"data with fingerprint {(champ_fp or 'unknown')[:16]}… (split {_split(champ_tags)}), not the "
                f"candidate's {fingerprint[:16]}… (split {_split(cand_tags)}): it may have trained on the test "
                "patients. Nothing was changed")
    if cand_learned is not None:
        seen |= cand_learned.seen
    patients = ev.patients
    test = np.unique(patients)
    excluded = np.intersect1d(test, np.fromiter(seen, np.int64, len(seen)))
    keep = ~np.isin(patients, excluded)
    counts = {"test": int(test.size), "excluded": int(excluded.size), "scored": int(test.size - excluded.size)}
    why = None
    if counts["scored"] < min_unseen * counts["test"] or counts["scored"] == 0:
        why = f"only {counts['scored']} of {counts['test']} test patients (below the floor of {min_unseen:.0%})"
    else:
        _, labels = ev.present()
        positive = labels > 0
        lost = [n for j, n in enumerate(ev.report["auroc"]["findings"])
                if positive[:, j].any() and not positive[keep, j].any()]
        if lost:
            why = f"no positive image left for {', '.join(lost)}"
    if why:
        raise PromotionError(
            f"{cand.name}: the champion (version {champ.version}, trained on data with fingerprint "
            f"{(champ_fp or 'unknown')[:16]}…) or the candidate saw {counts['excluded']} of the {counts['test']} test "
            f"patients of {data} (fingerprint {fingerprint[:16]}…) in training or validation, leaving {why}. "
            "Nothing was changed: compare them on data the champion never saw (--data), or lower --min-unseen")
    return keep, counts, champ_fp


def _split(tags: dict[str, str]) -> str:
    parts = [f"{k.rsplit('.', 1)[-1]}={tags[k]}" for k in ("cxr.split.seed", "cxr.split.val_fraction",
                                                           "cxr.split.test_fraction") if k in tags]
    return ", ".join(parts) or "as prepared"


def _act(client: Any, decision: Decision, cand: registry.Version, champ: registry.Version | None) -> Decision:
    """Tag the decision on the candidate, then move the aliases if promoted (tags first: an alias never moves
    without its reason on record). The caller holds the registry's lock."""
    m = (decision.comparison or {}).get("mean", {})
    p = decision.patients
    registry.tag(client, decision.name, cand.version, {
        "cxr.decision": decision.verdict, "cxr.decision.reasons": "; ".join(decision.reasons),
        "cxr.decision.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cxr.decision.first": "true" if decision.first else None,
        "cxr.decision.champion_version": decision.champion, "cxr.decision.fingerprint": decision.fingerprint,
        "cxr.decision.champion_fingerprint": decision.champion_fingerprint,
        "cxr.decision.test_patients": p.get("test"), "cxr.decision.excluded_patients": p.get("excluded"),
        "cxr.decision.scored_patients": p.get("scored"),
        "cxr.decision.champion_auroc_mean": m.get("a"), "cxr.decision.candidate_auroc_mean": m.get("b"),
        "cxr.decision.difference": m.get("difference"), "cxr.decision.ci_low": m.get("low"),
        "cxr.decision.ci_high": m.get("high")})
    if decision.promoted:
        registry.crown(client, decision.name, cand.version, champ)
        if champ:  # a first champion is said by the decision itself
            log.info("%s: version %s is the champion (version %s is @previous)", decision.name, cand.version,
                     champ.version)
    return decision
