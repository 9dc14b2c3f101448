"""What a person reads after a run: the per-finding AUROC table (figures are `cxr.evaluation.figures`)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from cxr import labels


def auroc_text(columns: Mapping[str, Mapping[str, float | None]]) -> str:
    """A fixed-width table, one row per finding and one column per split (e.g. val, test), plus the mean."""
    names = list(columns)
    lines = [f"{'finding':<20}" + "".join(f"{n:>10}" for n in names)]
    for finding in [*labels.FINDINGS, "mean"]:
        cells = []
        for n in names:
            v = columns[n].get(finding)
            cells.append(f"{'undef':>10}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:>10.4f}")
        lines.append(f"{finding:<20}" + "".join(cells))
    return "\n".join(lines)
