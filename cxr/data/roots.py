"""Which reader reads a dataset root: NIH's (`cxr.data.metadata`) or a spec's (`cxr.data.tabular`).

`cxr prepare` and raw mode plan their rows from what `read` returns, so a root gives the same rows, splits
and order either way; `findings` is the label set a dataset name or spec file stands for.
"""

from __future__ import annotations

import logging
from collections import Counter

from cxr import labels, storage
from cxr.data import metadata, tabular
from cxr.data.spec import load as load_spec
from cxr.redact import redact

log = logging.getLogger(__name__)

NIH = "nih"


def is_nih(dataset: str | None) -> bool:
    """True for NIH's reader: no dataset, `nih`, or a spec file with `reader: nih` (a copy of nih.yaml)."""
    return dataset in (None, NIH) or load_spec(dataset)[0].reader == "nih"


def findings(dataset: str | None) -> tuple[str, ...]:
    """The finding names, in label order, of a built-in dataset name or spec file (NIH's 14 for None/nih)."""
    return labels.FINDINGS if is_nih(dataset) else tuple(load_spec(dataset)[0].labels.names)  # type: ignore[arg-type]


def name(dataset: str | None) -> str:
    """The spec's own name (what a manifest records); `nih` for NIH's reader."""
    return NIH if dataset in (None, NIH) else load_spec(dataset)[0].name


def require(root: str) -> None:
    """A dataset root that is not there fails here, named as such, not later as a file missing from it."""
    fs, path = storage.filesystem(root)
    if not storage.retry(root, lambda: fs.isdir(path), "probing"):
        raise FileNotFoundError(f"{'not a folder' if storage.exists(root) else 'no such folder'}: {redact(root)}")


def read(data_root: str, dataset: str | None, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2,
         scan_images: bool = True) -> metadata.Dataset | tabular.TabularDataset:
    """A root's usable rows. With a spec, every image's existence is checked (`scan_images`): a missing file is
    an excluded row, counted by kind in the log, not a failed shard or a crash in a reading thread."""
    if is_nih(dataset):
        ds = metadata.load(data_root, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
        if not ds.images_present:
            raise FileNotFoundError(f"{data_root}: no images/ or images_0NN/images/ folder")
        return ds
    sp, source = load_spec(dataset)  # type: ignore[arg-type]
    ds = tabular.load(sp, data_root, source=source, seed=seed, val_fraction=val_fraction,
                      test_fraction=test_fraction, scan_images=scan_images)
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(excluded(ds).items()))
    if kinds:
        log.warning("%s: %d of %d rows excluded (%s)", data_root, ds.rows_read - len(ds.table), ds.rows_read, kinds)
    if not len(ds.table):
        raise ValueError(f"{data_root}: no usable rows in {' + '.join(ds.files)} with {source} ({kinds or 'no rows'});"
                         " nothing to read (`cxr inspect --dataset` lists why)")
    return ds


def excluded(ds: tabular.TabularDataset) -> Counter:
    """Excluded rows by problem kind."""
    return Counter(p.kind for p in ds.problems if p.fatal)
