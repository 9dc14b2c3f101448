"""The manifest: the contract `cxr prepare` writes and every later stage reads; only this module knows its schema.

`OUT_URI/manifest.json` holds the label vocabulary, how the images were preprocessed (size, codec, split
seed), where they came from (the source root, redacted, and a fingerprint of its metadata files), and per
split the images, patients (count and ids), label counts and shards (name, records, sha256, bytes) in order. A shard's
records are the split's images in the order the shard writer planned, so "image k of the split" is a
stable address across workers, epochs and re-runs. `fingerprint` identifies the exact bytes a model was
trained or evaluated on: a hash of every shard's checksum. A root read with a dataset spec also records the
spec (`dataset`) and per split the uncertain counts; a manifest without `dataset` is NIH's.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr import labels, storage
from cxr.data import metadata
from cxr.data.tabular import TabularDataset
from cxr.redact import redact

FORMAT = "cxr-shards/1"
NAME = "manifest.json"
CODECS = ("jpeg", "png", "uint8")  # uint8: the pixels themselves, row-major, no header


@dataclass(frozen=True)
class Shard:
    """One shard object of a split: where it is, which split positions it holds, and what it must hash to."""

    url: str
    offset: int  # position of the shard's first record in the split
    records: int
    sha256: str
    nbytes: int


def url_of(uri: str) -> str:
    """Accept OUT_URI or OUT_URI/manifest.json."""
    return uri if uri.endswith(".json") else storage.join(uri, NAME)


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "://" in url else os.path.dirname(url)


SYNTHETIC = "cxr-synthetic.json"  # written by `cxr synth` into a root: models trained on it are marked so


def is_synthetic(root: str) -> bool:
    """Whether a dataset root was written by `cxr synth` (phantoms, not radiographs)."""
    return storage.exists(storage.join(root, SYNTHETIC))


@dataclass(frozen=True)
class Manifest:
    """A read manifest: typed accessors over the JSON, so nobody else indexes into it."""

    uri: str
    data: dict[str, Any]

    @property
    def url(self) -> str:
        return url_of(self.uri)

    @property
    def size(self) -> int:
        """Side of the stored square images, in pixels."""
        return int(self.data["preprocessing"]["size"])

    @property
    def codec(self) -> str:
        return str(self.data["preprocessing"]["codec"])

    @property
    def splits(self) -> list[str]:
        return list(self.data["splits"])

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self.data["splits"]:
            raise ValueError(f"{redact(self.url)}: no split {split!r} (has {sorted(self.data['splits'])})")
        return self.data["splits"][split]

    def images(self, split: str) -> int:
        return int(self._split(split)["images"])

    @property
    def findings(self) -> tuple[str, ...]:
        """The label set, in the order of the shards' `labels` feature (NIH's 14 in a manifest without one)."""
        return tuple(self.data.get("labels") or labels.FINDINGS)

    @property
    def dataset(self) -> dict[str, Any] | None:
        """{"name", "source", "spec"} of a root read with a dataset spec; None for NIH's."""
        return self.data.get("dataset")

    @property
    def dataset_name(self) -> str:
        return self.dataset["name"] if self.dataset else "nih"

    @property
    def synthetic(self) -> bool:
        """Prepared from a `cxr synth` root (a manifest from before the mark says nothing: False)."""
        return bool(self.data["source"].get("synthetic", False))

    def label_counts(self, split: str) -> tuple[list[int], int]:
        """(positives per finding in `findings` order, images) of a split: what the weighted loss needs."""
        part = self._split(split)
        return [int(part["label_counts"][name]) for name in self.findings], int(part["images"])

    def uncertain_counts(self, split: str) -> list[int]:
        """Uncertain labels per finding in `findings` order (zeros where none were recorded: NIH's)."""
        counts = self._split(split).get("uncertain_counts", {})
        return [int(counts.get(name, 0)) for name in self.findings]

    def patient_ids(self, split: str) -> list[int] | None:
        """The split's distinct patient ids (None in a manifest written before they were recorded); a spec's
        text ids are stored as `shards.patient_key` ints, the ids the shards' `patient` feature holds."""
        ids = self._split(split).get("patient_ids")
        return None if ids is None else [int(p) for p in ids]

    def shards(self, split: str) -> list[Shard]:
        """The split's shards in manifest order, each with the split position of its first record."""
        base = _parent(self.url)
        out, offset = [], 0
        for s in self._split(split)["shards"]:
            out.append(Shard(storage.join(base, split, s["name"]), offset, s["records"], s["sha256"], s["bytes"]))
            offset += s["records"]
        return out

    @property
    def fingerprint(self) -> str:
        """sha256 over every split's shard checksums, in order: equal fingerprints mean byte-identical data."""
        h = hashlib.sha256()
        for split in sorted(self.data["splits"]):
            for s in self.data["splits"][split]["shards"]:
                h.update(f"{split}/{s['name']}:{s['sha256']}\n".encode())
        return h.hexdigest()


def load(uri: str) -> Manifest:
    """Read and check a manifest (OUT_URI or its manifest.json, any fsspec URL)."""
    url = url_of(uri)
    data = json.loads(storage.read_text(url))
    if data.get("format") != FORMAT:
        raise ValueError(f"{redact(url)}: format {data.get('format')!r}, expected {FORMAT!r}")
    if data["preprocessing"].get("codec") not in CODECS:
        raise ValueError(f"{redact(url)}: codec {data['preprocessing'].get('codec')!r} is not one of {CODECS}")
    return Manifest(uri, data)


def source_fingerprint(ds: metadata.Dataset) -> str:
    """sha256 over the metadata files that define the dataset (CSV, lists, boxes)."""
    h = hashlib.sha256()
    for name in (ds.csv_name, metadata.TRAIN_VAL_LIST, metadata.TEST_LIST, metadata.BBOX_NAME):
        url = storage.join(ds.root, name)
        if storage.exists(url):
            h.update(name.encode() + b"\0" + storage.read_bytes(url))
    return h.hexdigest()


def _splits(receipts: list[dict], findings: tuple[str, ...], nih: bool) -> dict[str, dict]:
    """Per split: images, patients, label counts (NIH's with its No Finding count, a spec's with uncertain
    counts instead: a spec may name a finding "No Finding") and shards in order."""
    splits: dict[str, dict] = {}
    for split in metadata.SPLITS:
        mine = sorted((r for r in receipts if r["split"] == split), key=lambda r: r["name"])
        counts = np.sum([r["label_counts"] for r in mine], axis=0) if mine else np.zeros(len(findings))
        label_counts = {name: int(c) for name, c in zip(findings, counts, strict=True)}
        if nih:
            label_counts[labels.NO_FINDING] = sum(r["no_finding"] for r in mine)
        splits[split] = {
            "images": sum(r["records"] for r in mine),
            "patients": len({p for r in mine for p in r["patients"]}),
            "patient_ids": sorted({int(p) for r in mine for p in r["patients"]}),
            "label_counts": label_counts,
            "shards": [{k: r[k] for k in ("name", "records", "sha256", "bytes")} for r in mine],
        }
        if not nih:
            uncertain = np.sum([r["uncertain_counts"] for r in mine], axis=0) if mine else np.zeros(len(findings))
            splits[split]["uncertain_counts"] = {name: int(c) for name, c in zip(findings, uncertain, strict=True)}
    return splits


def _outcomes(receipts: list[dict]) -> tuple[list[dict], list[dict]]:
    quarantine = sorted((q for r in receipts for q in r["quarantine"]), key=lambda q: q["image"])
    notes = sorted((n for r in receipts for n in r.get("notes", ())), key=lambda n: n["image"])
    return quarantine, notes


def build(ds: metadata.Dataset, preprocessing: dict[str, Any], receipts: list[dict]) -> dict[str, Any]:
    """The manifest of a prepared root: vocabulary, preprocessing, source, per split and shard counts."""
    quarantine, notes = _outcomes(receipts)
    return {
        "format": FORMAT,
        "labels": list(labels.FINDINGS),
        "preprocessing": preprocessing,
        "source": {
            "root": redact(ds.root), "csv": ds.csv_name, "fingerprint": source_fingerprint(ds),
            "rows_read": ds.rows_read, "usable_rows": len(ds.table), "official_split": ds.official_split,
            "synthetic": is_synthetic(ds.root),
        },
        "splits": _splits(receipts, labels.FINDINGS, nih=True),
        "quarantine": quarantine,
        "notes": notes,
        "excluded_by_metadata": [{"image": p.image, "kind": p.kind, "detail": p.detail}
                                 for p in ds.problems if p.fatal],
    }


def spec_fingerprint(ds: TabularDataset) -> str:
    """sha256 over the metadata files a spec read (labels, joins, split CSVs), in the order it read them."""
    h = hashlib.sha256()
    for rel in ds.files:
        h.update(rel.encode() + b"\0" + storage.read_bytes(storage.join(ds.root, rel)))
    return h.hexdigest()


def build_spec(ds: TabularDataset, preprocessing: dict[str, Any], receipts: list[dict]) -> dict[str, Any]:
    """The manifest of a root read with a dataset spec: NIH's keys, the spec itself under "dataset", uncertain
    counts per split, and each excluded row's file and line."""
    findings = tuple(ds.spec.labels.names)
    quarantine, notes = _outcomes(receipts)
    excluded = [p for p in ds.problems if p.fatal]
    return {
        "format": FORMAT,
        "labels": list(findings),
        "dataset": {"name": ds.spec.name, "source": redact(ds.source), "spec": ds.spec.model_dump(mode="json")},
        "preprocessing": preprocessing,
        "source": {
            "root": redact(ds.root), "csv": ds.files[0], "files": list(ds.files), "fingerprint": spec_fingerprint(ds),
            "rows_read": ds.rows_read, "usable_rows": len(ds.table), "official_split": ds.official_split,
            "split_note": ds.split_note, "synthetic": is_synthetic(ds.root),
        },
        "splits": _splits(receipts, findings, nih=False),
        "quarantine": quarantine,
        "notes": notes,
        "excluded_counts": dict(sorted(Counter(p.kind for p in excluded).items())),
        "excluded_by_metadata": [{"image": p.image, "kind": p.kind, "detail": p.detail, "file": p.file,
                                  "line": p.line} for p in excluded],
    }


def write(out_uri: str, manifest: dict[str, Any]) -> str:
    """Commit the manifest (atomically: readers see the old one or the new one); returns its URL."""
    url = storage.join(out_uri, NAME)
    storage.write_text(url, json.dumps(manifest, indent=1))
    return url
