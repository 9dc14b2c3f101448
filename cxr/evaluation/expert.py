"""`cxr evaluate --labels FILE --label-map MAP`: radiologists' labels replace the data's for the images they cover.

Text-mined labels (NIH's are said to be ">90% accurate") are not what a review board trusts; adjudicated relabels
of some images are (Majkowska et al.: four findings on NIH test and validation images). FILE (CSV or Parquet)
names each image and holds a column per adjudicated finding. MAP is data in the dataset-spec style
(`cxr.data.spec`: unknown keys refused, errors naming the file and the dotted key; a built-in name or a YAML
file): which column holds which finding, what its cells mean (YES: positive), and which of the predictions'
findings score it: one, the max of several ("Nodule or mass": max(Nodule, Mass)), or none (listed as not scored,
with the map's reason). Only the images FILE labels are scored, and the report says how many; a row naming an
image the data does not have is an error naming the row (its patient and split would be unknown), as for a
predictions table (`cxr.evaluation.tables`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from cxr.data import spec
from cxr.data.spec import Column, Part, parse
from cxr.evaluation import tables
from cxr.redact import redact

CODES = {"positive": 1.0, "negative": 0.0, "unknown": -1.0}  # -1: the image is not scored for that finding


class LabelsError(ValueError):
    """A label file or map that cannot be used as given; the message names the file, rows, columns or keys."""


class Finding(Part):
    """One adjudicated finding: its column, and the predictions' findings whose maximum probability scores it."""

    column: str | None = Field(None, description="the file's column (default: the finding's name)")
    scored_by: list[str] = Field(default_factory=list, description="findings of the predictions; several: their "
                                 "max probability; none: not scored (give `reason`)")
    reason: str | None = Field(None, description="why it is not scored, said in the report")

    @model_validator(mode="after")
    def _reasoned(self) -> Finding:
        if not self.scored_by and not self.reason:
            raise ValueError("scored_by is empty: give `reason`, why the predictions cannot score this finding")
        return self


class LabelMap(Part):
    """How a file of expert labels reads: its image column, its cell values and its findings."""

    name: str
    description: str = ""
    image: Column = Field(description="the image-name column (a path's trailing part is matched, as for tables)")
    values: dict[str, Literal["positive", "negative", "unknown"]] = Field(min_length=1, description="cell text "
                                                                          "(case-insensitive) -> what it means")
    blank: Literal["error", "unknown", "negative"] = Field("error", description="what an empty cell means")
    findings: dict[str, Finding] = Field(min_length=1)

    @field_validator("values", mode="before")
    @classmethod
    def _quoted(cls, values: Any) -> Any:
        if isinstance(values, dict) and any(isinstance(k, bool) for k in values):
            raise ValueError("YAML reads YES, NO, true, on, ... unquoted as true/false: quote the cell values, "
                             "e.g. {\"YES\": positive, \"NO\": negative}")
        return values


@dataclass(frozen=True)
class ExpertLabels:
    """A label file read through its map: per row, the image name and the labels of the findings it scores."""

    uri: str
    source: str  # where the map came from
    map: LabelMap
    images: list[str]
    labels: np.ndarray  # [rows, scored findings] 1 / 0 / -1 unknown
    names: tuple[str, ...]  # the scored findings, as the map names them
    scored_by: tuple[tuple[int, ...], ...]  # each one's columns in the predictions
    unscored: list[dict[str, str]]

    def scores(self, probs: np.ndarray) -> np.ndarray:
        """The predictions' probabilities [images, their findings] as scores of the map's findings (max)."""
        return np.stack([probs[:, list(cols)].max(axis=1) for cols in self.scored_by], axis=1).astype(probs.dtype)


def builtin_names() -> list[str]:
    return spec.builtin_names("cxr.evaluation", "labelmaps")


def load_map(name_or_path: str) -> tuple[LabelMap, str]:
    """The label map and where it came from: a built-in name (cxr/evaluation/labelmaps/), else a YAML file."""
    text, source = spec.read_named(name_or_path, "label map", "cxr.evaluation", "labelmaps")
    return parse(text, source, LabelMap, "label map", "name, image, values, findings"), source


def _cells(values: Any) -> list[str]:
    """A column's cells as text people wrote: NaN blank, 1.0 read from a numeric column as '1'."""
    import pandas as pd

    out = []
    for v in values:
        if v is None or (not isinstance(v, str) and pd.isna(v)):
            out.append("")
        elif isinstance(v, float) and v.is_integer():
            out.append(str(int(v)))
        else:
            out.append(str(v).strip())
    return out


def read(uri: str, label_map: str, findings: tuple[str, ...]) -> ExpertLabels:
    """FILE at `uri` read through `label_map`, scored by the predictions' `findings`; missing columns, findings
    the predictions do not have, unknown cell values and rows naming no image are errors naming them."""
    import pandas as pd

    from cxr.data.tabular import _extract

    m, source = load_map(label_map)
    frame = tables.read_frame(uri)
    where = redact(uri)
    columns = {name: f.column or name for name, f in m.findings.items()}
    need = {"image.column": m.image.column, **{f"findings.{n}.column": c for n, c in columns.items()}}
    missing = [f"{key} {col!r}" for key, col in need.items() if col not in frame.columns]
    if missing:
        raise LabelsError(f"{where}: no column for {'; '.join(missing)} of {source}; its columns: "
                          f"{', '.join(map(str, frame.columns))}")
    by_name = {tables.norm(f): j for j, f in enumerate(findings)}
    unknown = [f"findings.{n}.scored_by {g!r}" for n, f in m.findings.items() for g in f.scored_by
               if tables.norm(g) not in by_name]
    if unknown:
        raise LabelsError(f"{source}: {'; '.join(unknown)}: not a finding of the predictions "
                          f"({', '.join(findings)})")
    codes = {k.strip().casefold(): CODES[v] for k, v in m.values.items()}
    if m.blank != "error":
        codes[""] = CODES[m.blank]
    bad, labels = [], {}
    for name, col in columns.items():
        cells = _cells(frame[col])
        labels[name] = np.array([codes.get(c.casefold(), np.nan) for c in cells], np.float32)
        bad += [f"row {i + 1} column {col!r}: {cells[i]!r}" for i in np.flatnonzero(np.isnan(labels[name]))]
    if bad:
        allowed = ", ".join(repr(k) for k in m.values) + ("" if m.blank == "error" else f", blank ({m.blank})")
        raise LabelsError(f"{where}: {len(bad)} cell(s) hold no value of {source} ({allowed}): {tables.shown(bad)}")
    names = _extract(pd.Series(_cells(frame[m.image.column]), dtype=object), m.image.regex).tolist()
    blank = [f"row {i + 1}" for i, v in enumerate(names) if not v]
    if blank:
        raise LabelsError(f"{where}: {len(blank)} row(s) name no image in column {m.image.column!r}: "
                          f"{tables.shown(blank)}")
    scored = [n for n, f in m.findings.items() if f.scored_by]
    if not scored:
        raise LabelsError(f"{source}: no finding has `scored_by`: nothing the predictions can be scored on")
    unscored = [{"finding": n, "side": "labels", "reason": f"the label map says: {f.reason}"}
                for n, f in m.findings.items() if not f.scored_by]
    return ExpertLabels(uri, source, m, names, np.stack([labels[n] for n in scored], axis=1) if scored else
                        np.zeros((len(names), 0), np.float32), tuple(scored),
                        tuple(tuple(by_name[tables.norm(g)] for g in m.findings[n].scored_by) for n in scored),
                        unscored)


@dataclass(frozen=True)
class Relabel:
    """Expert labels joined to the data's images: what `cxr evaluate` scores in place of the data's labels."""

    labels: ExpertLabels
    images: tables.Known
    row_of: np.ndarray  # per image of the data: its row in the file, -1 when the file does not label it

    def take(self, idx: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Of the images `idx` (into the data's images) predicted as `probs`: which the file labels, their
        labels and their scores."""
        rows = self.row_of[idx]
        keep = rows >= 0
        return keep, self.labels.labels[rows[keep]], self.labels.scores(probs[keep])

    def describe(self, scored: int, threshold_images: int) -> dict[str, Any]:
        """The report's account of the label source: the file, its map, and where its rows went."""
        m, rows = self.labels.map, len(self.labels.images)
        return {"source": "label file", "file": redact(self.labels.uri), "map": self.labels.source, "name": m.name,
                "description": m.description, "values": dict(m.values), "blank": m.blank,
                "findings": {n: {"column": f.column or n, "scored_by": list(f.scored_by),
                                 "score": "max of" if len(f.scored_by) > 1 else "probability of" if f.scored_by
                                 else "not scored", "reason": f.reason} for n, f in m.findings.items()},
                "rows": rows, "scored": scored, "threshold_images": threshold_images,
                "elsewhere": rows - scored - threshold_images}


def relabel(uri: str, label_map: str, findings: tuple[str, ...], images: tables.Known, data_uri: str) -> Relabel:
    """FILE read and joined to the data's images by name (a path's trailing part matches, as for tables)."""
    ex = read(uri, label_map, findings)
    at = tables.locate_names(ex.uri, ex.images, images, data_uri)
    row_of = np.full(len(images.names), -1, np.int64)
    row_of[at] = np.arange(len(at))
    return Relabel(ex, images, row_of)
