"""The 14 ChestX-ray14 findings in one canonical order, and parsing of NIH label strings.

Every stage (metadata, shards, model outputs, metrics) indexes findings by this order, so it lives
in exactly one place.
"""

from __future__ import annotations

import numpy as np

FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NUM_FINDINGS = len(FINDINGS)
NO_FINDING = "No Finding"
INDEX = {name: i for i, name in enumerate(FINDINGS)}

# Spellings used by NIH files other than Data_Entry (BBox_List_2017.csv says "Infiltrate").
ALIASES = {"Infiltrate": "Infiltration"}


def canonical(name: str) -> str | None:
    """The canonical finding for a label as spelled in any NIH file, or None if unknown."""
    name = name.strip()
    name = ALIASES.get(name, name)
    return name if name in INDEX else None


def parse(text: str) -> tuple[np.ndarray, list[str]]:
    """Multi-hot vector for a `Finding Labels` cell ("A|B", "No Finding") and the unknown labels in it.

    "No Finding" is all zeros. Unknown labels are returned, never guessed at, so the caller can
    report the row; an empty cell counts as an unknown label "".
    """
    vec = np.zeros(NUM_FINDINGS, dtype=np.uint8)
    unknown: list[str] = []
    parts = [p.strip() for p in str(text).split("|")]
    for part in parts:
        if part == NO_FINDING and len(parts) == 1:
            continue
        name = canonical(part)
        if name is None:
            unknown.append(part)
        else:
            vec[INDEX[name]] = 1
    return vec, unknown


def format_labels(vec: np.ndarray) -> str:
    """Inverse of `parse`: the NIH `Finding Labels` string for a multi-hot vector."""
    names = [FINDINGS[i] for i in np.flatnonzero(vec)]
    return "|".join(names) if names else NO_FINDING
