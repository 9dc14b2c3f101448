"""`cxr evaluate --predictions`: a table of predictions made elsewhere, scored exactly as a model's are.

A team puts cxr's champion beside a published model's predictions on the same patients: the table (CSV or
Parquet) names each image (`Image Index`, `path` — a path's trailing part is the image's name in the dataset —
or `--image-column`) and holds one probability column per finding of the data, named by the finding, with an
optional common prefix or suffix (`prob_Atelectasis`) that is detected and reported. `cxr predict`'s Parquet is
one such table (its yes/no and provenance columns are not numbers, so they are not candidates). Labels, patients
and sex / age / view come from the data's metadata (a raw root's, or a manifest's shards): no image is read.
The statistics are `cxr.evaluation.evaluate.statistics`, the paired comparison (`--against`) `cxr promote`'s.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr import storage
from cxr.evaluation import evaluate as ev_mod
from cxr.evaluation import subgroups
from cxr.evaluation.bootstrap import paired_difference
from cxr.inference import Predictions
from cxr.labels import FINDINGS
from cxr.redact import redact

log = logging.getLogger(__name__)
IMAGE_COLUMNS = ("Image Index", "path")  # looked for in this order unless --image-column names one
SHOWN = 5  # offending rows / images named in an error before "and N more"


class TableError(ValueError):
    """A predictions table that cannot be scored as given; the message names the file, rows and columns."""


@dataclass(frozen=True)
class Table:
    """A predictions table read against a label set: each row's image name and the findings' probabilities."""

    uri: str
    image_column: str
    images: list[str]
    probs: np.ndarray  # [rows, findings] float32, in the data's finding order
    columns: dict[str, str]  # finding -> the table's column
    affix: str  # how the columns are named: "the finding names", "prefix 'prob_'", ...


@dataclass(frozen=True)
class Known:
    """Every image of the data's splits, in split order then split position: what a table is joined on."""

    names: list[str]
    labels: np.ndarray  # [images, findings] 1 / 0 / -1 unknown (the data's uncertain policy applied)
    patients: np.ndarray
    split: np.ndarray  # each image's split name
    position: np.ndarray  # each image's position in its split


def _shown(items: list[str]) -> str:
    more = len(items) - SHOWN
    return "; ".join(items[:SHOWN]) + (f"; and {more} more" if more > 0 else "")


def _frame(uri: str) -> Any:
    import pandas as pd

    name = uri.lower().rsplit("?", 1)[0]
    data = storage.read_bytes(uri)
    if name.endswith((".parquet", ".pq")):
        return pd.read_parquet(io.BytesIO(data))
    if name.endswith((".csv", ".csv.gz")):
        return pd.read_csv(io.BytesIO(data), compression="gzip" if name.endswith(".gz") else None)
    raise TableError(f"{redact(uri)}: a predictions table must be .csv, .csv.gz or .parquet")


def _norm(name: str) -> str:
    """Column and finding names compared as people write them: case, '_' / '-' / spaces do not matter."""
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


def _numbers(frame: Any, column: str) -> tuple[np.ndarray, list[int]]:
    """A column as floats, and the rows (0-based) whose cell is not a number at all (NaN cells stay NaN)."""
    import pandas as pd

    raw = frame[column]
    if pd.api.types.is_bool_dtype(raw):
        return np.full(len(raw), np.nan), list(range(len(raw)))
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    return values, [i for i in np.flatnonzero(np.isnan(values)) if not pd.isna(raw.iloc[i])]


def _finding_columns(uri: str, frame: Any, findings: tuple[str, ...], skip: str) -> tuple[dict[str, str], str]:
    """Which column holds each finding: the (prefix, suffix) around the finding names that most numeric columns
    share; a finding without its column is an error naming what was looked for and what is there."""
    numeric = [c for c in frame.columns if c != skip and not np.isnan(_numbers(frame, c)[0]).all()]
    support: dict[tuple[str, str], set[str]] = {}
    for column in numeric:
        text = _norm(column)
        for f in findings:
            at = text.find(_norm(f))
            if at >= 0:
                support.setdefault((text[:at], text[at + len(_norm(f)):]), set()).add(f)
    if not support:
        raise TableError(f"{redact(uri)}: no numeric column is named by a finding of the data ({', '.join(findings)}"
                         f"), with or without a common prefix or suffix; its columns: {', '.join(map(str, frame))}")
    best = max(len(s) for s in support.values())
    tied = [a for a, s in support.items() if len(s) == best]
    if len(tied) > 1 and ("", "") not in tied:
        raise TableError(f"{redact(uri)}: the finding columns could be named with " + " or ".join(
            f"prefix {p!r} and suffix {s!r}" for p, s in tied) + ": keep one set of probability columns")
    prefix, suffix = ("", "") if ("", "") in tied else tied[0]
    by_name = {_norm(c): c for c in numeric}
    columns = {f: by_name[prefix + _norm(f) + suffix] for f in findings if prefix + _norm(f) + suffix in by_name}
    missing = [f for f in findings if f not in columns]
    if missing:  # the expected names as the table writes its others (prob_X, not the compared 'prob x')
        raw = next(((c[:c.lower().find(g.lower())], c[c.lower().find(g.lower()) + len(g):])
                    for g, c in columns.items() if g.lower() in c.lower()), (prefix, suffix))
        raise TableError(f"{redact(uri)}: no probability column for {len(missing)} finding(s) of the data: "
                         + ", ".join(f"{f} (column {raw[0] + f + raw[1]!r})" for f in missing)
                         + f"; numeric columns present: {', '.join(map(str, numeric))}")
    affix = ("the finding names" if not prefix and not suffix else
             " and ".join(x for x in (f"prefix {prefix!r}" if prefix else "", f"suffix {suffix!r}" if suffix else "")
                          if x) + f" around the finding names (e.g. {columns[findings[0]]!r} for {findings[0]})")
    return columns, affix


def read(uri: str, findings: tuple[str, ...], image_column: str | None = None) -> Table:
    """The table at `uri` as image names and probabilities of `findings`; blanks, text, NaN and values outside
    [0, 1] are errors naming the rows (counted from 1, the first row after the header) and columns."""
    frame = _frame(uri)
    where = redact(uri)
    if image_column is None:
        image_column = next((c for c in IMAGE_COLUMNS if c in frame.columns), None)
        if image_column is None:
            raise TableError(f"{where}: no image column ({' or '.join(IMAGE_COLUMNS)}; or name it with "
                             f"--image-column); its columns: {', '.join(map(str, frame.columns))}")
    elif image_column not in frame.columns:
        raise TableError(f"{where}: no column {image_column!r}; its columns: {', '.join(map(str, frame.columns))}")
    columns, affix = _finding_columns(uri, frame, findings, image_column)
    bad: list[str] = []
    probs = np.zeros((len(frame), len(findings)))
    for j, f in enumerate(findings):
        values, text = _numbers(frame, columns[f])
        probs[:, j] = values
        rows = sorted({*text, *np.flatnonzero(~np.isfinite(values) | (values < 0) | (values > 1)).tolist()})
        bad += [f"row {i + 1} column {columns[f]!r}: {frame[columns[f]].iloc[i]!r}" for i in rows]
    if bad:
        raise TableError(f"{where}: {len(bad)} cell(s) are not probabilities in [0, 1] (blank, NaN or text): "
                         + _shown(bad))
    names = frame[image_column]
    blank = [f"row {i + 1}" for i, v in enumerate(names) if not isinstance(v, str) or not v.strip()]
    if blank:
        raise TableError(f"{where}: {len(blank)} row(s) name no image in column {image_column!r}: {_shown(blank)}")
    log.info("%s: %d rows; probabilities in columns named by %s", where, len(frame), affix)
    # float32, as a model's predictions are: a table written from them is scored exactly as they were
    return Table(uri, image_column, [v.strip() for v in names], probs.astype(np.float32), columns, affix)


def known(data: Any, uncertain: str = "ignore") -> Known:
    """The data's images with their labels and patients, read from its metadata or its shards' records."""
    from cxr.data import manifest, metadata, raw, reader

    names: list[str] = []
    labels, patients, split, position = [], [], [], []
    for s in metadata.SPLITS:
        if data.source == "shards":
            n, y, p = reader.split_images(manifest.load(data.manifest_uri).shards(s))
        else:
            n, y, p = raw.split_images(data.root, s, data.split_seed, data.val_fraction, data.test_fraction,
                                       data.dataset)
        if n:
            names += n
            labels.append(y.reshape(len(n), -1))
            patients.append(p)
            split += [s] * len(n)
            position.append(np.arange(len(n)))
    if not names:
        raise TableError("the data has no image")
    y = np.concatenate(labels).astype(np.float32)
    if uncertain != "ignore":
        y = np.where(y < 0, 1.0 if uncertain == "ones" else 0.0, y).astype(np.float32)
    return Known(names, y, np.concatenate(patients), np.array(split, dtype=object), np.concatenate(position))


def locate(table: Table, images: Known, data_uri: str) -> np.ndarray:
    """Each table row's index in `images`: a name, or a path whose trailing part is one (the basename or more);
    unknown images and rows naming one image twice are errors listing them."""
    index = {n: i for i, n in enumerate(images.names)}
    at = np.full(len(table.images), -1, np.int64)
    for r, name in enumerate(table.images):
        parts = name.replace("\\", "/").split("/")
        at[r] = next((index[t] for t in ("/".join(parts[k:]) for k in range(len(parts))) if t in index), -1)
    unknown = [f"row {r + 1} {table.images[r]!r}" for r in np.flatnonzero(at < 0)]
    if unknown:
        raise TableError(f"{redact(table.uri)}: {len(unknown)} of {len(at)} images are not in {redact(data_uri)} "
                         f"(refused: their labels and patients are unknown): {_shown(unknown)}")
    first: dict[int, int] = {}
    twice = []
    for r, i in enumerate(at.tolist()):
        if i in first:
            twice.append(f"rows {first[i] + 1} and {r + 1} ({images.names[i]})")
        first.setdefault(i, r)
    if twice:
        raise TableError(f"{redact(table.uri)}: {len(twice)} image(s) appear more than once: {_shown(twice)}")
    return at


def _attributes(source: Any, data: Any, images: Known, idx: np.ndarray) -> dict[str, np.ndarray] | None:
    """Sex, age and view of the images `idx`, gathered from each split's stored values."""
    if source.attributes is None:
        return None
    out: dict[str, np.ndarray] = {}
    for s in dict.fromkeys(images.split[idx]):
        here = images.split[idx] == s
        for a, v in source.attributes(data, s).items():
            out.setdefault(a, np.empty(len(idx), dtype=np.asarray(v).dtype))[here] = np.asarray(v)[
                images.position[idx[here]]]
    return out


def evaluate_table(predictions: str, data_uri: str, image_column: str | None = None, split: str | None = None,
                   val_split: str | None = "val", out: str | None = None, resamples: int = 2000,
                   confidence: float = 0.95, seed: int = 0, subgroup_attributes: str | tuple = "auto",
                   age_bands: tuple[int, ...] = subgroups.AGE_BANDS, against: str | None = None,
                   tracking_uri: str | None = None, batch_size: int = 64) -> ev_mod.Evaluation:
    """The report of `cxr evaluate --model` for the table's rows (those of `split` when given; then the
    operating thresholds are chosen on its rows of `val_split`), and with `against` (another table, or a model
    predicted here) the paired patient-bootstrap comparison of the two on their common images."""
    from cxr.data import source as sources

    if not data_uri:
        raise TableError(f"{redact(predictions)}: scoring a table needs the data its images come from (--data)")
    subgroup_attributes = subgroups.parse_attributes(subgroup_attributes)
    age_bands = subgroups.parse_bands(age_bands)
    data = sources.data_config(data_uri, 224)  # the size is never used: no image is read
    source = sources.for_config(data)
    names = sources.findings(data)
    images = known(data, data.uncertain)
    table = read(predictions, names, image_column)
    at = locate(table, images, data_uri)
    order = np.argsort(at, kind="stable")  # the data's order: the report does not depend on the table's
    rows = order if split is None else order[images.split[at[order]] == split]
    if not len(rows):
        raise TableError(f"{redact(predictions)}: none of its {len(at)} images is in the {split} split of "
                         f"{redact(data_uri)}")
    val_rows = [] if split is None or val_split in (None, split) else order[images.split[at[order]] == val_split]
    idx = at[rows]
    probs, labels, patients = table.probs[rows], images.labels[idx], images.patients[idx]
    val = (table.probs[val_rows], images.labels[at[val_rows]]) if len(val_rows) else None
    where = "the table's images" if split is None else f"the table's images of the {split} split"
    ci, stats = ev_mod.statistics(probs, labels, patients, names, lambda: _attributes(source, data, images, idx),
                                  where, val, resamples, confidence, seed, subgroup_attributes, age_bands)
    counts = {s: int((images.split[idx] == s).sum()) for s in dict.fromkeys(images.split[idx])}
    summary = {
        "model": {"uri": redact(predictions), "run_id": None, "registered": None,
                  "table": {"image_column": table.image_column, "columns": table.columns, "named_by": table.affix,
                            "rows": len(at)}},
        "data": {"uri": redact(data_uri), "fingerprint": sources.fingerprint(data),
                 "split": split or "the table's images", "threshold_split": val_split if val is not None else None,
                 "images": int(len(idx)), "patients": int(len(set(patients.tolist()))), "unreadable_images": 0,
                 "splits": counts, "outside_split": int(len(at) - len(rows) - len(val_rows)),
                 "preprocessing": None},
        **stats, "label_map": None, "unscored": [],
        "anchors": list(ev_mod.ANCHORS) if names == FINDINGS else [],
    }
    if "subgroups" in stats:
        summary["subgroups"] = summary.pop("subgroups")
    if against:
        summary["comparison"] = _compare(against, data_uri, data, images, idx, probs, names, ci,
                                         image_column, tracking_uri, batch_size)
    evaluation = ev_mod.Evaluation(summary, Predictions(probs, labels, np.ones(len(idx), bool)), patients, ci, out)
    if out:
        ev_mod.write(evaluation, out)
    return evaluation


def _other(against: str, data_uri: str, data: Any, images: Known, names: tuple[str, ...], image_column: str | None,
           tracking_uri: str | None, batch_size: int, splits: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """The other side's probabilities by index into `images` (NaN where it has none), and its findings."""
    probs = np.full((len(images.names), len(names)), np.nan, np.float32)
    if against.lower().rsplit("?", 1)[0].endswith((".csv", ".csv.gz", ".parquet", ".pq")):
        other = read(against, names, image_column)
        probs[locate(other, images, data_uri)] = other.probs
        return probs, names
    from cxr.evaluation.evaluate import evaluate

    tags = {"cxr.split.seed": str(data.split_seed), "cxr.split.val_fraction": str(data.val_fraction),
            "cxr.split.test_fraction": str(data.test_fraction)}
    scored: set[int] = set()
    for s in splits:  # the model's images of each split the table covers, split exactly as the table's data
        ev = evaluate(against, data_uri, split=s, val_split=None, record=False, split_tags=tags,
                      subgroup_attributes=(), resamples=1, tracking_uri=tracking_uri, batch_size=batch_size)
        here, seen, m = np.flatnonzero(images.split == s), ev.predictions.seen, ev.mapping
        if not np.array_equal(ev.predictions.labels[seen], images.labels[here[seen]]):
            raise TableError(f"{redact(against)} was scored on other images or labels than the {s} split of "
                             f"{redact(data_uri)}")
        probs[np.ix_(here[seen], list(m.data_index))] = ev.predictions.probs[seen][:, list(m.model_index)]
        scored |= set(m.data_index)
    return probs, tuple(n for j, n in enumerate(names) if j in scored)


def _compare(against: str, data_uri: str, data: Any, images: Known, idx: np.ndarray, probs: np.ndarray,
             names: tuple[str, ...], ci: Any, image_column: str | None, tracking_uri: str | None,
             batch_size: int) -> dict[str, Any]:
    """`cxr promote`'s paired patient bootstrap of this table against `against` on their common images:
    difference = this table - against, on the same patient resamples."""
    splits = list(dict.fromkeys(images.split[idx]))
    other, shared = _other(against, data_uri, data, images, names, image_column, tracking_uri, batch_size, splits)
    cols = [names.index(n) for n in shared]
    common = np.isfinite(other[idx][:, cols]).all(axis=1)
    if not common.any():
        raise TableError(f"{redact(against)} has no prediction for any of the evaluated images")
    keep = idx[common]
    paired = paired_difference(images.labels[keep][:, cols], other[keep][:, cols], probs[common][:, cols],
                               images.patients[keep], resamples=ci.resamples, confidence=ci.confidence,
                               seed=ci.seed, names=shared)
    return {"against": redact(against), "images": int(common.sum()), "left_out": int((~common).sum()),
            "patients": int(len(set(images.patients[keep].tolist()))), "a": "against", "b": "this table",
            **paired.to_dict()}
