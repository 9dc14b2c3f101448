"""Raw mode's reading: a dataset root's image files, read, decoded and resized in threads, in prepare's order.

A split's rows are the ones `cxr prepare` would write, in the same order (the same metadata, split seed and
shard planner), so image k of a split here is image k of its shards. Files are read and preprocessed by
`cxr.data.images` (the one preprocessing path: every format prepare accepts, the same pixels) on a thread
pool, mostly outside the GIL; a file that cannot be decoded is a CorruptImageError naming it, skipped and
recorded with on_corrupt="skip". Images travel to tf.data in chunks, which amortises the Python hand-off.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

from cxr import storage
from cxr.data import images, metadata, roots
from cxr.data.png import LIMITS, ImageLimits
from cxr.data.reader import CorruptImageError, Stats, ordered_map

CHUNK = 32  # images per generator element

Row = tuple[str, np.ndarray, int]  # url, labels, position in the split


def _split_records(data_root: str, split: str, split_seed: int, val_fraction: float,
                   test_fraction: float, dataset: str = "nih") -> tuple[dict, ...]:
    """The metadata rows of a split in position order: the order `cxr prepare` with the same seed writes."""
    from cxr.data import shards

    if split not in metadata.SPLITS:
        raise ValueError(f"split must be one of {metadata.SPLITS}, got {split!r}")
    ds = roots.read(data_root, dataset, seed=split_seed, val_fraction=val_fraction, test_fraction=test_fraction)
    params = shards.Params(seed=split_seed, images_per_shard=max(1, len(ds.table)))
    return next((spec.rows for spec in shards.plan(ds, params) if spec.split == split), ())


def split_rows(data_root: str, split: str, split_seed: int = 0, val_fraction: float = 0.1,
               test_fraction: float = 0.2, dataset: str = "nih") -> list[tuple[str, np.ndarray]]:
    """(url, labels: 1, 0, -1 uncertain) of a split in position order: the order `cxr prepare` with the same
    seed writes shards in."""
    rows = _split_records(data_root, split, split_seed, val_fraction, test_fraction, dataset)
    return [(r["path"], np.array(r["y"], dtype=np.float32)) for r in rows]


def split_patients(data_root: str, split: str, split_seed: int = 0, val_fraction: float = 0.1,
                   test_fraction: float = 0.2, dataset: str = "nih") -> np.ndarray:
    """Each image's patient id, by position in the split: the unit a bootstrap resamples."""
    rows = _split_records(data_root, split, split_seed, val_fraction, test_fraction, dataset)
    return np.array([int(r["patient"]) for r in rows], dtype=np.int64)


def split_images(data_root: str, split: str, split_seed: int = 0, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, dataset: str = "nih") -> tuple[list[str], np.ndarray, np.ndarray]:
    """Each image's name (relative to the root), labels (1, 0, -1 uncertain) and patient id by position in the
    split: what a table of predictions made elsewhere is joined on (`cxr.evaluation.tables`)."""
    rows = _split_records(data_root, split, split_seed, val_fraction, test_fraction, dataset)
    y = np.array([r["y"] for r in rows], dtype=np.float32).reshape(len(rows), -1)
    return [str(r["image"]) for r in rows], y, np.array([int(r["patient"]) for r in rows], dtype=np.int64)


def split_attributes(data_root: str, split: str, split_seed: int = 0, val_fraction: float = 0.1,
                     test_fraction: float = 0.2, dataset: str = "nih") -> dict[str, np.ndarray]:
    """Each image's sex, age and view by position in the split, as the shards store them ("" / NaN: unknown)."""
    rows = _split_records(data_root, split, split_seed, val_fraction, test_fraction, dataset)

    def text(key: str) -> np.ndarray:
        return np.array(["" if not isinstance(r[key], str) else r[key].strip() for r in rows], dtype=object)

    age = np.array([r["age"] for r in rows], dtype=np.float64)
    return {"sex": text("sex"), "age": np.where(age < 0, np.nan, age), "view": text("view")}


def read_image(url: str, size: int, limits: ImageLimits = LIMITS) -> tuple[np.ndarray, int]:
    """An image file as uint8 [size, size], exactly as `cxr prepare` stores it, and the file's size in bytes.

    Every decoding failure, including an image beyond `limits` (refused from its header, before any
    allocation), is a CorruptImageError naming the file.
    """
    data = storage.read_bytes(url)
    try:
        return images.preprocess(data, size, limits), len(data)
    except ValueError as exc:  # the decoders say what is wrong
        raise CorruptImageError(f"{url}: {exc}") from exc


def _read_or_skip(row: Row, size: int, on_corrupt: str, stats: Stats) -> tuple[np.ndarray | None, Row]:
    url = row[0]
    if url in stats.skipped:  # known bad from an earlier pass
        return None, row
    try:
        image, nbytes = read_image(url, size)
    except CorruptImageError as exc:
        if on_corrupt == "raise":
            raise
        stats.skip(url, str(exc))
        return None, row
    stats.read(images=1, nbytes=nbytes)
    return image, row


def stream(rows: list[Row], training: bool, seed: int, epoch: int, size: int, threads: int, ahead: int,
           on_corrupt: str, stats: Stats) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """This worker's images, pass after pass (training: each pass a (seed, epoch + p) permutation), in chunks."""
    def items() -> Iterator[Row]:
        for p in itertools.count() if training else (0,):
            order = np.random.default_rng([seed, epoch + p]).permutation(len(rows)) if training else range(len(rows))
            for i in order:
                yield rows[i]
            if training and all(url in stats.skipped for url, _, _ in rows):
                raise RuntimeError(f"every image of this worker was skipped as corrupt ({stats.skipped_count})")

    chunk: list[tuple[np.ndarray, Row]] = []
    for image, row in ordered_map(lambda r: _read_or_skip(r, size, on_corrupt, stats), items(), threads, ahead):
        if image is not None:
            chunk.append((image, row))
        if len(chunk) == CHUNK:
            yield _stack(chunk)
            chunk = []
    if chunk:
        yield _stack(chunk)


def _stack(chunk: list[tuple[np.ndarray, Row]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.stack([image for image, _ in chunk])[..., None], np.stack([row[1] for _, row in chunk]),
            np.array([row[2] for _, row in chunk], dtype=np.int64))
