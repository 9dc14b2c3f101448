"""Where a config's batches come from: prepared shards (`data.source: shards`) or a raw root (`raw`).

Training, validation and test scoring ask a `DataSource` for a split's batches, its size and its label
counts, and never care which kind it is. Tests plug in in-memory sources with the same callables.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr import config as cfgmod
from cxr.labels import FINDINGS

# make_dataset(data, split, batch_size, worker_index=, num_workers=, training=, epoch=, unit=) -> batches
DatasetFn = Callable[..., Any]  # a tf.data.Dataset
SizeFn = Callable[[cfgmod.Data, str], int]
CountsFn = Callable[[cfgmod.Data, str], tuple[list[int], int]]
StoredSizeFn = Callable[[cfgmod.Data], int | None]
PatientsFn = Callable[[cfgmod.Data, str], np.ndarray]
FindingsFn = Callable[[cfgmod.Data], tuple[str, ...]]
AttributesFn = Callable[[cfgmod.Data, str], dict[str, np.ndarray]]
DescribedFn = Callable[[cfgmod.Data, str], tuple[np.ndarray, dict[str, np.ndarray]]]


@dataclass(frozen=True)
class DataSource:
    """A split's batches, size and label counts, and the side of the images before the training resize."""

    make_dataset: DatasetFn
    split_size: SizeFn
    label_counts: CountsFn
    stored_size: StoredSizeFn = lambda data: None
    may_skip: bool = False  # unreadable images are skipped and reported (raw mode), not a failure
    patients: PatientsFn | None = None  # each image's patient id by split position (for patient-level CIs)
    patient_ids: PatientsFn | None = None  # a split's distinct patient ids, sorted (what a model learned from)
    findings: FindingsFn = lambda data: FINDINGS  # the label set, in label order: sizes the head, names metrics
    attributes: AttributesFn | None = None  # each image's sex / age / view by split position ("" / NaN: unknown)
    described: DescribedFn | None = None  # (patients, attributes) of a split from one read of its records


def for_config(data: cfgmod.Data) -> DataSource:
    return RAW if data.source == "raw" else SHARDS


def findings(data: cfgmod.Data) -> tuple[str, ...]:
    """The finding names of the data, in label order: the manifest's (shards) or data.dataset's (raw)."""
    return for_config(data).findings(data)


def _raw_findings(data: cfgmod.Data) -> tuple[str, ...]:
    from cxr.data import roots

    return roots.findings(data.dataset)


def _positives(positives: np.ndarray, uncertain: np.ndarray, policy: str) -> list[int]:
    """Positives per finding as training sees them: under `ones` an uncertain label is one more positive."""
    return [int(c) for c in (positives + uncertain if policy == "ones" else positives)]


# ------------------------------------------------------------------------------------------------ shards


def _manifest(data: cfgmod.Data) -> Any:
    """The config's manifest, refused if data.dataset was set to another dataset than the one it was prepared from."""
    from cxr.data import manifest, roots
    from cxr.redact import redact

    m = manifest.load(data.manifest_uri)
    if data.dataset is not None and roots.name(data.dataset) != m.dataset_name:
        raise ValueError(f"data.dataset is {redact(data.dataset)!r} but {redact(m.url)} was prepared from dataset "
                         f"{m.dataset_name!r}: the manifest's label set wins; drop data.dataset or prepare again")
    return m


def _shard_dataset(data: cfgmod.Data, split: str, batch_size: int, worker_index: int = 0, num_workers: int = 1,
                   training: bool = False, epoch: int = 0, unit: bool = True) -> Any:
    from cxr.data import pipeline

    # data.dataset was checked against the manifest when the driver asked for the label set (`findings`): not
    # again here, where every worker would read the manifest a second time each epoch.
    return pipeline.make_dataset(data.manifest_uri, split, batch_size, worker_index=worker_index,
                                 num_workers=num_workers, training=training, seed=data.seed, epoch=epoch,
                                 image_size=data.image_size, augment=data.augment if training else None,
                                 uncertain=data.uncertain, unit=unit)


def _shard_size(data: cfgmod.Data, split: str) -> int:
    from cxr.data import manifest

    return manifest.load(data.manifest_uri).images(split)


def _shard_counts(data: cfgmod.Data, split: str) -> tuple[list[int], int]:
    m = _manifest(data)
    positives, images = m.label_counts(split)
    return _positives(np.array(positives), np.array(m.uncertain_counts(split)), data.uncertain), images


def _shard_stored_size(data: cfgmod.Data) -> int:
    from cxr.data import manifest

    return manifest.load(data.manifest_uri).size


def _shard_patients(data: cfgmod.Data, split: str) -> np.ndarray:
    from cxr.data import manifest, reader

    return reader.split_patients(manifest.load(data.manifest_uri).shards(split))


def _shard_patient_ids(data: cfgmod.Data, split: str) -> np.ndarray:
    from cxr.data import manifest

    ids = manifest.load(data.manifest_uri).patient_ids(split)
    return np.unique(_shard_patients(data, split)) if ids is None else np.asarray(ids, np.int64)


def _shard_attributes(data: cfgmod.Data, split: str) -> dict[str, np.ndarray]:
    from cxr.data import manifest, reader

    return reader.split_attributes(manifest.load(data.manifest_uri).shards(split))


def _shard_described(data: cfgmod.Data, split: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    from cxr.data import manifest, reader

    _, _, patients, attributes = reader.split_images(manifest.load(data.manifest_uri).shards(split))
    return patients, attributes


SHARDS = DataSource(_shard_dataset, _shard_size, _shard_counts, _shard_stored_size, patients=_shard_patients,
                    patient_ids=_shard_patient_ids, findings=lambda data: tuple(_manifest(data).findings),
                    attributes=_shard_attributes, described=_shard_described)


# --------------------------------------------------------------------------------------------------- raw


@functools.lru_cache(maxsize=8)
def _rows(root: str, split: str, seed: int, val_fraction: float, test_fraction: float, dataset: str) -> tuple:
    from cxr.data import raw

    return tuple(raw.split_rows(root, split, seed, val_fraction, test_fraction, dataset))


def raw_rows(data: cfgmod.Data, split: str) -> tuple:
    """(url, labels: 1, 0, -1 uncertain) of a raw root's split, in prepare's order (read once per process)."""
    return _rows(data.root, split, data.split_seed, data.val_fraction, data.test_fraction, data.dataset)


def _raw_dataset(data: cfgmod.Data, split: str, batch_size: int, worker_index: int = 0, num_workers: int = 1,
                 training: bool = False, epoch: int = 0, unit: bool = True) -> Any:
    from cxr.data import pipeline

    return pipeline.make_raw_dataset(
        data.root, split, batch_size, worker_index=worker_index, num_workers=num_workers, training=training,
        seed=data.seed, epoch=epoch, image_size=data.image_size, augment=data.augment if training else None,
        on_corrupt="skip", raw_size=_raw_stored_size(data), split_seed=data.split_seed,
        val_fraction=data.val_fraction, test_fraction=data.test_fraction, dataset=data.dataset,
        uncertain=data.uncertain, unit=unit)


def _raw_size(data: cfgmod.Data, split: str) -> int:
    return len(raw_rows(data, split))


def _raw_counts(data: cfgmod.Data, split: str) -> tuple[list[int], int]:
    rows = raw_rows(data, split)
    y = np.stack([r[1] for r in rows]) if rows else np.zeros((0, len(findings(data))))
    return _positives((y == 1).sum(axis=0), (y < 0).sum(axis=0), data.uncertain), len(rows)


def _raw_stored_size(data: cfgmod.Data) -> int:
    return data.raw_size or data.image_size


def _raw_patients(data: cfgmod.Data, split: str) -> np.ndarray:
    from cxr.data import raw

    return raw.split_patients(data.root, split, data.split_seed, data.val_fraction, data.test_fraction,
                              data.dataset)


def _raw_attributes(data: cfgmod.Data, split: str) -> dict[str, np.ndarray]:
    from cxr.data import raw

    return raw.split_attributes(data.root, split, data.split_seed, data.val_fraction, data.test_fraction,
                                data.dataset)


def _raw_described(data: cfgmod.Data, split: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    from cxr.data import raw

    _, _, patients, attributes = raw.split_images(data.root, split, data.split_seed, data.val_fraction,
                                                  data.test_fraction, data.dataset)
    return patients, attributes


RAW = DataSource(_raw_dataset, _raw_size, _raw_counts, _raw_stored_size, may_skip=True, patients=_raw_patients,
                 patient_ids=lambda data, split: np.unique(_raw_patients(data, split)), findings=_raw_findings,
                 attributes=_raw_attributes, described=_raw_described)


# ------------------------------------------------------------------------------------- data by its URI


def synthetic(data: cfgmod.Data) -> bool:
    """Whether the data are `cxr synth` phantoms: a model trained on them says so wherever it predicts."""
    from cxr.data import manifest

    if data.source == "shards":
        return manifest.load(data.manifest_uri).synthetic
    return manifest.is_synthetic(data.root)


def data_tags(data: cfgmod.Data, redacted: bool = True) -> dict[str, str]:
    """What a model's run must say about its data so it can be scored again exactly as it was split and sized."""
    from cxr.redact import redact

    tags = {"cxr.data": redact(data.location) if redacted else data.location, "cxr.data.source": data.source}
    if data.source == "raw":
        tags.update({"cxr.split.seed": str(data.split_seed), "cxr.split.val_fraction": str(data.val_fraction),
                     "cxr.split.test_fraction": str(data.test_fraction),
                     "cxr.preprocessing.raw_size": str(_raw_stored_size(data))})
        if data.dataset not in (None, "nih"):  # how to read the root again; a manifest records its own
            tags["cxr.data.dataset"] = redact(data.dataset) if redacted else data.dataset
    return tags


SPLIT_TAGS = ("cxr.split.seed", "cxr.split.val_fraction", "cxr.split.test_fraction")


def data_config(uri: str, image_size: int, tags: dict[str, str] | None = None,
                split_tags: dict[str, str] | None = None, dataset: str | None = None) -> cfgmod.Data:
    """The data section for scoring a model on `uri`: a manifest (or its folder), or else a dataset root.

    A raw root is split as `split_tags` say (default: the model's own run tags, `cxr.split.*`) and its images
    are preprocessed as the model's were (`cxr.preprocessing.raw_size`); without tags, the defaults. A raw
    root is read as `dataset` says (a spec name or file), else as the model's run read its own
    (`cxr.data.dataset`), else as NIH's.
    """
    from cxr import storage
    from cxr.data import manifest

    if storage.exists(manifest.url_of(uri)):
        return cfgmod.Data(source="shards", manifest_uri=uri, image_size=image_size, allow_upsample=True,
                           dataset=dataset)  # checked against the manifest's own when its findings are read
    tags = tags or {}
    split = tags if split_tags is None else split_tags
    raw_size = tags.get("cxr.preprocessing.raw_size")
    return cfgmod.Data(source="raw", root=uri, image_size=image_size, allow_upsample=True,
                       raw_size=int(raw_size) if raw_size else None,
                       dataset=dataset or tags.get("cxr.data.dataset"),
                       split_seed=int(split.get("cxr.split.seed", 0)),
                       val_fraction=float(split.get("cxr.split.val_fraction", 0.1)),
                       test_fraction=float(split.get("cxr.split.test_fraction", 0.2)))


def fingerprint(data: cfgmod.Data) -> str:
    """What identifies the data a model saw: the manifest's shard checksums, or a raw root's metadata files."""
    from cxr.data import manifest, metadata, roots

    if data.source == "shards":
        return manifest.load(data.manifest_uri).fingerprint
    if roots.is_nih(data.dataset):
        return manifest.source_fingerprint(metadata.load(data.root, seed=data.split_seed,
                                                         val_fraction=data.val_fraction,
                                                         test_fraction=data.test_fraction))
    return manifest.spec_fingerprint(roots.read(data.root, data.dataset, seed=data.split_seed,  # type: ignore[arg-type]
                                                val_fraction=data.val_fraction, test_fraction=data.test_fraction,
                                                scan_images=False))
