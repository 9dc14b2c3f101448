"""What a model learned from: its data's fingerprint and the patients of its training and validation splits.

A promotion must score the champion only on patients it never saw; without official split lists a re-prepared
root reshuffles the patient split, so "the same data URI" says nothing. Every training run therefore records
the ids of its training and validation patients (`provenance/patients.json` in the run's artifacts) and their
hashes and counts as run tags (`cxr.patients.train.sha256`, …), beside `cxr.data.fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

ARTIFACT_DIR = "provenance"
ARTIFACT = "patients.json"
ROLES = ("train", "val")


def patients_hash(ids: Iterable[int]) -> str:
    """sha256 of the sorted distinct ids, one per line: equal hashes mean the same patients."""
    return hashlib.sha256("".join(f"{int(p)}\n" for p in sorted({int(p) for p in ids})).encode()).hexdigest()


@dataclass(frozen=True)
class Learned:
    """The patients a model trained and was validated on, and the fingerprint of that data."""

    fingerprint: str
    train: frozenset[int]
    val: frozenset[int]

    @property
    def seen(self) -> frozenset[int]:
        return self.train | self.val


def record(client: Any, run_id: str, fingerprint: str, train: Iterable[int], val: Iterable[int]) -> dict[str, str]:
    """Log the artifact and the tags into the run; returns the tags (they also go on the registered version)."""
    ids = {"train": sorted({int(p) for p in train}), "val": sorted({int(p) for p in val})}
    tags = {"cxr.data.fingerprint": fingerprint}
    for role in ROLES:
        tags[f"cxr.patients.{role}.sha256"] = patients_hash(ids[role])
        tags[f"cxr.patients.{role}.count"] = str(len(ids[role]))
    with tempfile.TemporaryDirectory(prefix="cxr-provenance-") as local:
        with open(os.path.join(local, ARTIFACT), "w") as fh:
            json.dump({"fingerprint": fingerprint, **ids}, fh)
        client.log_artifact(run_id, os.path.join(local, ARTIFACT), artifact_path=ARTIFACT_DIR)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    return tags


def learned_from(client: Any, run_id: str) -> Learned | None:
    """The run's record, checked against its tags; None for a run that recorded none (trained before it existed)."""
    from mlflow.exceptions import MlflowException

    tags = client.get_run(run_id).data.tags
    if "cxr.patients.train.sha256" not in tags:
        return None
    with tempfile.TemporaryDirectory(prefix="cxr-provenance-") as local:
        try:
            path = client.download_artifacts(run_id, f"{ARTIFACT_DIR}/{ARTIFACT}", local)
        except (MlflowException, OSError) as exc:
            raise ValueError(f"run {run_id} is tagged with its training patients but "
                             f"{ARTIFACT_DIR}/{ARTIFACT} cannot be read: {exc}") from exc
        with open(path) as fh:
            data = json.load(fh)
    for role in ROLES:
        if patients_hash(data[role]) != tags[f"cxr.patients.{role}.sha256"]:
            raise ValueError(f"run {run_id}: {ARTIFACT_DIR}/{ARTIFACT} does not match its tag "
                             f"cxr.patients.{role}.sha256 (the record was altered)")
    return Learned(str(data["fingerprint"]), frozenset(data["train"]), frozenset(data["val"]))
