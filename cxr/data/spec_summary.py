"""What `cxr inspect --dataset SPEC` reports about a root read with a spec: plain data, and the text table.

Same layout as NIH's inspect table (`render_nih`), with the spec's own finding names and an uncertain
column, since uncertain labels exist only in the spec-read datasets.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from cxr import labels
from cxr.data import spec, tabular
from cxr.data.tabular import SPLITS, TabularDataset

MAX_SHOWN = 20  # problems listed in the text; --json has them all


def _counts(y: np.ndarray, names: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    positive = {n: int((y[:, j] == 1).sum()) for j, n in enumerate(names)}
    uncertain = {n: int(np.isnan(y[:, j]).sum()) for j, n in enumerate(names)}
    return positive, uncertain


def inspect(dataset: str, root: str, **options) -> dict:
    """Load the spec (built-in name or file), read the root with it (options: tabular.load's), summarise."""
    sp, source = spec.load(dataset)
    return summary(tabular.load(sp, root, source=source, **options))


def summary(ds: TabularDataset) -> dict:
    """The facts inspect reports, JSON-able."""
    t, names = ds.table, ds.spec.labels.names
    positive, uncertain = _counts(ds.y, names)
    splits = {}
    for name in SPLITS:
        mask = (t["split"] == name).to_numpy()
        splits[name] = {"images": int(mask.sum()), "patients": int(t.loc[mask, "patient"].nunique()),
                        "label_counts": _counts(ds.y[mask], names)[0]}
    overlap = int((t.groupby("patient")["split"].nunique() > 1).sum()) if len(t) else 0
    return {
        "root": ds.root,
        "dataset": ds.spec.name,
        "spec": ds.source,
        "files": ds.files,
        "rows": ds.rows_read,
        "usable_rows": len(t),
        "excluded_rows": ds.rows_read - len(t),
        "patients": int(t["patient"].nunique()),
        "studies": int(t["study"].nunique()) if ds.spec.study else None,
        "images_checked": ds.images_checked,
        "official_split": ds.official_split,
        "split_note": ds.split_note,
        "findings": list(names),
        "label_counts": positive,
        "uncertain_counts": uncertain,
        "view_positions": ({k: int(v) for k, v in t["view"].value_counts().sort_index().items()}
                           if ds.spec.view else {}),
        "splits": splits,
        "patient_overlap": overlap,
        "ignored_labels": dict(ds.ignored_labels.most_common()),
        "problem_counts": dict(sorted(Counter(p.kind for p in ds.problems).items())),
        "problems": [dict(vars(p)) for p in ds.problems],  # asdict's deep copies cost 3 s for 50,000 problems
    }


def render(s: dict) -> str:
    """The text table, in the style of NIH's inspect."""
    lines = [f"{s['root']}  (dataset {s['dataset']}: {', '.join(s['files'])})"]
    checked = "yes" if s["images_checked"] else "not checked (--scan-images)"
    studies = f"  studies {s['studies']:,}" if s["studies"] is not None else ""
    lines.append(f"  rows {s['rows']:,}  usable {s['usable_rows']:,}  excluded {s['excluded_rows']:,}  "
                 f"patients {s['patients']:,}{studies}  images present: {checked}")
    kind = "official + patient-grouped val" if s["official_split"] else "patient-grouped, seeded"
    note = f"; {s['split_note']}" if s["split_note"] else ""
    lines.append(f"  splits ({kind}{note}); patients in more than one split: {s['patient_overlap']}")
    width = max(20, *(len(n) + 2 for n in s["findings"]))
    lines.append(f"  {'finding':<{width}}{'all':>9}" + "".join(f"{n:>9}" for n in s["splits"]) + f"{'uncertain':>10}")
    for name in s["findings"]:
        row = f"  {name:<{width}}{s['label_counts'][name]:>9,}"
        row += "".join(f"{part['label_counts'][name]:>9,}" for part in s["splits"].values())
        lines.append(row + f"{s['uncertain_counts'][name]:>10,}")
    parts = s["splits"].values()
    lines.append(f"  {'images':<{width}}{s['usable_rows']:>9,}" + "".join(f"{p['images']:>9,}" for p in parts))
    lines.append(f"  {'patients':<{width}}{s['patients']:>9,}" + "".join(f"{p['patients']:>9,}" for p in parts))
    if s["view_positions"]:
        lines.append("  views: " + ", ".join(f"{k or '(blank)'} {v:,}" for k, v in s["view_positions"].items()))
    if s["ignored_labels"]:
        shown = list(s["ignored_labels"].items())[:10]
        more = len(s["ignored_labels"]) - len(shown)
        lines.append(f"  labels outside the label set (ignored): {', '.join(f'{k} {v:,}' for k, v in shown)}"
                     + (f" … {more} more" if more > 0 else ""))
    problems = s["problems"]
    if problems:
        lines.append(f"  problems: {len(problems)} ({', '.join(f'{k} {v}' for k, v in s['problem_counts'].items())})")
        for p in problems[:MAX_SHOWN]:
            lines.append(f"    {p['kind']:<22} {p['file']}:{p['line']:<6} {p['image'] or '-'}  {p['detail']}")
        if len(problems) > MAX_SHOWN:
            lines.append(f"    … {len(problems) - MAX_SHOWN} more (use --json for all)")
    else:
        lines.append("  problems: none")
    return "\n".join(lines)


def render_nih(s: dict) -> str:
    """NIH's inspect summary (`cxr.data.metadata.summary`) as text: the same columns as `render`'s."""
    lines: list[str] = []
    lines.append(f"{s['root']}  ({s['csv']})")
    lines.append(f"  rows {s['rows']:,}  usable {s['usable_rows']:,}  excluded {s['excluded_rows']:,}  "
          f"patients {s['patients']:,}  images present: {'yes' if s['images_present'] else 'no (metadata only)'}")
    split_kind = "official lists + patient-grouped val" if s["official_split"] else "patient-grouped, seeded"
    lines.append(f"  splits ({split_kind}); patients in more than one split: {s['patient_overlap']}")
    names = [*labels.FINDINGS, labels.NO_FINDING]
    lines.append(f"  {'finding':<20}{'all':>9}" + "".join(f"{n:>9}" for n in s["splits"]))
    for name in names:
        row = f"  {name:<20}{s['label_counts'][name]:>9,}"
        row += "".join(f"{part['label_counts'][name]:>9,}" for part in s["splits"].values())
        lines.append(row)
    parts = s["splits"].values()
    lines.append(f"  {'images':<20}{s['usable_rows']:>9,}" + "".join(f"{p['images']:>9,}" for p in parts))
    lines.append(f"  {'patients':<20}{s['patients']:>9,}" + "".join(f"{p['patients']:>9,}" for p in parts))
    b = s["bboxes"]
    if b["total"]:
        per = ", ".join(f"{k} {v}" for k, v in b["per_finding"].items() if v)
        lines.append(f"  bounding boxes: {b['total']} on {b['images']} images ({per})")
    if s["problems"]:
        kinds = ", ".join(f"{k} {v}" for k, v in s["problem_counts"].items())
        lines.append(f"  problems: {len(s['problems'])} ({kinds})")
        for p in s["problems"][:20]:
            lines.append(f"    {p['kind']:<22} {p['image']:<18} {p['detail']}")
        if len(s["problems"]) > 20:
            lines.append(f"    … {len(s['problems']) - 20} more (use --json for all)")
    else:
        lines.append("  problems: none")
    return "\n".join(lines)
