"""The order in which MLflow 3.17's UI shows a run's metric charts, as its bundle computes it.

Read from mlflow/server/js/build/static/js/main.c2f5f8d4.js (MLflow 3.17.2), class `RunsChartsCardConfig`:
- `extractChartSectionName(key, "/")`: `key.split("/").slice(0, -1).join("/")`, i.e. the part before the LAST
  "/"; "" becomes "Model metrics", "system" becomes "System metrics".
- `getBaseChartAndSectionConfigs` (a run page's first view): the other sections `.sort()`ed (UTF-16 code
  units: case-sensitive, "/" < digits < "A".."Z" < "_" < "a".."z"), then the pinned ones. The run page
  (9930.05913dd5.chunk.js) shows one tab per kind: "Model metrics" (no `system/` keys, pinned "Model metrics")
  and "System metrics".
- `updateChartAndSectionConfigs` (each later data refresh, unless the user dragged sections): the same but
  sorted with `localeCompare` (ICU: "_" < "/" < digits < letters, case only as a last resort).
The page's sections are saved per run and tab in the browser's local storage ("RunPage", `<run id>-model`).
"""

from __future__ import annotations

MODEL, SYSTEM = "Model metrics", "System metrics"


def section(key: str) -> str:
    """The section a metric's chart is in (`extractChartSectionName`)."""
    name = "/".join(key.split("/")[:-1])
    if name == "":
        return MODEL
    return SYSTEM if name + "/" == "system/" else name


def sections(keys: list[str], tab: str = "model") -> list[str]:
    """The sections of a run page's tab ("model" or "system") top to bottom, for a run that logged `keys`."""
    pinned = MODEL if tab == "model" else SYSTEM
    shown = [k for k in keys if k.startswith("system/") == (tab == "system")]
    return sorted({section(k) for k in shown} - {MODEL, SYSTEM}) + [pinned]


def sorted_alike(names: list[str]) -> bool:
    """Whether `localeCompare` orders `names` (sorted by code units) as `.sort()` does: each neighbour pair is
    decided by a prefix, or at the first difference by two lowercase letters or digits, or two capitals or
    digits (where ICU's and the code units' orders agree)."""
    lower, upper = set("abcdefghijklmnopqrstuvwxyz0123456789"), set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    for a, b in zip(names, names[1:], strict=False):
        i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if i is not None and not ({a[i], b[i]} <= lower or {a[i], b[i]} <= upper):
            return False
    return True
