"""Which findings of one label set are the same findings of another (issue 21 §2), from `cxr/labelmap.yaml`.

Why: a model trained on NIH's 14 findings can be scored on a CheXpert or PadChest root only on the findings
both name, under whatever spelling each uses ("Effusion" = "Pleural Effusion" = "pleural effusion"). The
equivalences are data, not code; a name matches case-insensitively, then through its equivalence group. Only
one-to-one pairs are shared: a broader label (CheXpert's Lung Lesion ⊇ NIH's Mass, Nodule) is never paired.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import yaml

SETS = ("nih", "chexpert", "padchest")  # the label-set columns of labelmap.yaml's groups


@dataclass(frozen=True)
class LabelMap:
    """The equivalence groups (name key → group name) and the broader labels (key → the findings they cover)."""

    groups: dict[str, str]
    broader: dict[str, tuple[str, ...]]


def key(name: str) -> str:
    """How names compare: case-insensitive, surrounding and repeated white space ignored."""
    return " ".join(name.split()).casefold()


@functools.cache
def load() -> LabelMap:
    """The package's labelmap.yaml."""
    return parse(resources.files("cxr").joinpath("labelmap.yaml").read_text("utf-8"))


def parse(text: str) -> LabelMap:
    """A labelmap YAML, validated: a name in two groups, or both broader and in a group, is an error naming it."""
    raw = yaml.safe_load(text)
    groups: dict[str, str] = {}
    for i, entry in enumerate(raw.get("equivalent", [])):
        group = entry.get("finding")
        if not group:
            raise ValueError(f"cxr/labelmap.yaml: equivalent.{i}: no `finding` (the group's name)")
        unknown = set(entry) - {"finding", "also", *SETS}
        if unknown:
            raise ValueError(f"cxr/labelmap.yaml: equivalent.{i}: unknown key(s) {sorted(unknown)}")
        names = [entry[s] for s in SETS if entry.get(s)] + list(entry.get("also", []))
        for name in names:
            k = key(name)
            if groups.get(k, group) != group:
                raise ValueError(f"cxr/labelmap.yaml: {name!r} is in groups {groups[k]!r} and {group!r}")
            groups[k] = group
    broader = {key(wide): tuple(narrow) for wide, narrow in (raw.get("broader") or {}).items()}
    for wide in broader:
        if wide in groups:
            raise ValueError(f"cxr/labelmap.yaml: {wide!r} is both broader than others and in group {groups[wide]!r}")
    return LabelMap(groups, broader)


def _concept(name: str, lm: LabelMap) -> str:
    k = key(name)
    return "group:" + lm.groups[k] if k in lm.groups else "name:" + k


def shared(model_findings: Sequence[str], data_findings: Sequence[str]) -> list[tuple[str, str]]:
    """(model name, data name) for every finding both sets name, in the model's order.

    Two names are the same finding when equal ignoring case or in one equivalence group. A finding that two
    names of one set would match (not one-to-one) is not shared: which of the two would be scored is unclear.
    """
    lm = load()
    model = [_concept(n, lm) for n in model_findings]
    data = [_concept(n, lm) for n in data_findings]
    pairs = []
    for name, concept in zip(model_findings, model, strict=True):
        hits = [d for d, c in zip(data_findings, data, strict=True) if c == concept]
        if len(hits) == 1 and model.count(concept) == 1:
            pairs.append((name, hits[0]))
    return pairs


def unmatched(model_findings: Sequence[str], data_findings: Sequence[str]) -> list[str]:
    """The model findings `shared` cannot pair with a data finding, in the model's order (swap the arguments
    for the data side)."""
    paired = {m for m, _ in shared(model_findings, data_findings)}
    return [m for m in model_findings if m not in paired]


def reasons(model_findings: Sequence[str], data_findings: Sequence[str]) -> dict[str, str]:
    """Why each of `unmatched`'s findings has no partner, in words for a report."""
    lm = load()
    data_concepts = [_concept(d, lm) for d in data_findings]
    model_concepts = [_concept(m, lm) for m in model_findings]
    out = {}
    for name in unmatched(model_findings, data_findings):
        concept = _concept(name, lm)
        hits = [d for d, c in zip(data_findings, data_concepts, strict=True) if c == concept]
        if len(hits) > 1 or model_concepts.count(concept) > 1:
            twins = [m for m, c in zip(model_findings, model_concepts, strict=True) if c == concept]
            out[name] = f"not one-to-one: model {twins} vs data {hits}"
            continue
        wider = [d for d in data_findings if key(name) in {key(n) for n in lm.broader.get(key(d), ())}]
        narrower = [d for d in data_findings if key(d) in {key(n) for n in lm.broader.get(key(name), ())}]
        if wider:
            out[name] = f"the data's {wider} cover {name} and more (not equivalent)"
        elif narrower:
            out[name] = f"{name} covers the data's {narrower} and more (not equivalent)"
        else:
            out[name] = "no equivalent in the data's label set"
    return out


def covered_by(broad: str) -> tuple[str, ...]:
    """The findings (as labelmap.yaml spells them) a broader label covers; () when it is not a broader label."""
    return load().broader.get(key(broad), ())
