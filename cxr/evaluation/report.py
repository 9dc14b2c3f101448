"""What a person reads after a run: the per-finding AUROC table and the evaluation report (figures are
`cxr.evaluation.figures`)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping


def auroc_text(columns: Mapping[str, Mapping[str, float | None]]) -> str:
    """A fixed-width table, one column per split (e.g. val, test), findings two to a row so it fits a screen,
    then the mean."""
    names = dict.fromkeys(f for col in columns.values() for f in col if f != "mean")  # the model's label set
    width = max([19, *(len(f) + 1 for f in names)])

    def cell(v: float | None) -> str:
        return f"{'undef':>9}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:>9.4f}"

    def row(finding: str) -> str:
        return f"{finding:<{width}}" + "".join(cell(columns[n].get(finding)) for n in columns)

    head = f"{'finding':<{width}}" + "".join(f"{n:>9}" for n in columns)
    rows = [row(f) for f in names]
    pairs = [f"{a}   {b}".rstrip() for a, b in itertools.zip_longest(rows[0::2], rows[1::2], fillvalue="")]
    return "\n".join([f"{head}   {head}", *pairs, row("mean")])


WIDTH = 100  # MLflow's artifact viewer shows about this many characters of a table row; wider ones are cut off


def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _ci(d: dict) -> str:
    return "undefined" if d.get("auroc") is None else f"{d['auroc']:.3f} [{_num(d['low'])}, {_num(d['high'])}]"


def _table(header: list[str], align: str, rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def _operating(rep: dict, threshold: str, point: str) -> list[list[str]]:
    """One row per finding at a validation-chosen threshold: the rates it reached on the evaluated split."""
    rows = []
    for name, f in rep["findings"].items():
        p = f[point] or {}
        found = f"{_num(p.get('sensitivity'))} ({p['tp']}/{p['tp'] + p['fn']})" if p else "–"
        rows.append([name, _num(f["thresholds"][threshold]), found, _num(p.get("specificity")), _num(p.get("ppv")),
                     _num(p.get("npv")), _num(p.get("f1"))])
    return rows


def _mean_probability(bins: list[dict]) -> float | None:
    n = sum(b["count"] for b in bins)
    return sum(b["confidence"] * b["count"] for b in bins if b["count"]) / n if n else None


def markdown(rep: dict) -> str:
    """The evaluation report as Markdown: what was scored, then one narrow table per question (AUROC, each
    operating point, calibration) so no row is wider than MLflow's artifact viewer, the anchors, the fine print."""
    au, data, model = rep["auroc"], rep["data"], rep["model"]
    pct = f"{100 * au['confidence']:.0f}%"
    reg = model.get("registered")
    val, split = data["threshold_split"], data["split"]
    if not rep["findings"]:  # scored without a validation split (as a promotion does): no operating points
        return "\n".join([f"# Evaluation of {model['uri']}" + (f" ({reg['name']} version {reg['version']})" if reg
                                                               else ""), "",
                          f"Split **{split}** of `{data['uri']}`: {data['images']:,} images of {data['patients']:,} "
                          f"patients. **Mean AUROC {_ci(au['mean'])}** ({pct} CI, {au['resamples']:,} bootstrap "
                          "resamples of patients). No validation split was scored: no thresholds.", "",
                          *_table(["finding", f"AUROC [{pct} CI]"], "lr", [[n, _ci(v)] for n, v in
                                                                           au["findings"].items()]),
                          *subgroup_tables(rep), *comparison(rep), ""])
    target = next(iter(rep["findings"].values()))["thresholds"]["sensitivity_target"]
    lines = [f"# Evaluation of {model['uri']}" + (f" ({reg['name']} version {reg['version']})" if reg else ""), "",
             f"Split **{split}** of `{data['uri']}`: {data['images']:,} images of {data['patients']:,} "
             f"patients (data fingerprint `{data['fingerprint'][:16]}…`)."
             + (f" {data['unreadable_images']} unreadable images were left out." if data["unreadable_images"] else ""),
             "",
             f"**Mean AUROC {_ci(au['mean'])}** ({pct} CI, {au['resamples']:,} bootstrap resamples of patients, "
             f"seed {au['seed']}). Thresholds were chosen on the {val} split and applied unchanged here.", "",
             "## Discrimination", ""]
    lines += _table(["finding", f"AUROC [{pct} CI]", "AUPRC", "prevalence"], "lrrr",
                    [[n, _ci(au["findings"][n]), _num(rep["findings"][n]["auprc"]),
                      _num(rep["findings"][n]["prevalence"], 4)] for n in rep["findings"]])
    operating = ["finding", "threshold", f"{split} sensitivity", f"{split} specificity", "PPV", "NPV", "F1"]
    reached = f"what it reached on {split} (true positives / positive images in brackets):"
    lines += ["", "## At the Youden threshold", "",
              f"The threshold maximising sensitivity + specificity - 1 on {val}; {reached}", ""]
    lines += _table(operating, "lrrrrrr", _operating(rep, "youden", "at_youden"))
    lines += ["", f"## At the threshold for sensitivity {target:g}", "",
              f"The highest threshold reaching sensitivity {target:g} on {val}; {reached}", ""]
    lines += _table(operating, "lrrrrrr", _operating(rep, "at_sensitivity", "at_sensitivity"))
    lines += ["", "PPV and NPV depend on prevalence: they hold for a population with this split's prevalence.",
              "", "## Calibration", "",
              "ECE is the image-weighted mean gap between predicted probability and observed frequency over 10 "
              "equal-width bins (see reliability.png).", ""]
    lines += _table(["finding", "ECE", "mean predicted probability", "observed frequency"], "lrrr",
                    [[n, _num(f["calibration"]["ece"]), _num(_mean_probability(f["calibration"]["bins"]), 4),
                      _num(f["prevalence"], 4)] for n, f in rep["findings"].items()])
    notes = [f"- {u['finding']}: not scored, {u['reason']}." for u in rep.get("unscored", [])]
    for name, f in rep["findings"].items():
        a = au["findings"][name]
        for why in (a.get("reason"), f.get("auprc_reason"), f["thresholds"].get("reason")):
            if why:
                notes.append(f"- {name}: {why}.")
    if notes:
        lines += ["", "## Undefined values", "", *dict.fromkeys(notes)]
    lines += subgroup_tables(rep) + comparison(rep)
    if rep["anchors"]:
        lines += ["", "## Published results", "", "Mean AUROCs for orientation (other models, other test sets):", ""]
        lines += _table(["model", "split", "mean AUROC"], "llr",
                        [[a["model"], a["split"], f"{a['mean_auroc']:.3f}"] for a in rep["anchors"]])
    return "\n".join(lines) + "\n"


def _interval(d: dict, key: str, low: str, high: str, sign: str = "") -> str:
    return f"{d[key]:{sign}.3f} [{d[low]:{sign}.3f}, {d[high]:{sign}.3f}]" if d[low] is not None else \
        f"{d[key]:{sign}.3f}"


def _gap(d: dict) -> str:
    """The gap to the overall AUROC with its CI, bold when the interval excludes 0."""
    if d["gap"] is None:
        return "–"
    text = _interval(d, "gap", "gap_low", "gap_high", "+")
    shown = d["gap_low"] is not None and (d["gap_low"] > 0 or d["gap_high"] < 0)
    return f"**{text}**" if shown else text


def subgroup_tables(rep: dict) -> list[str]:
    """One table per attribute (report.json's "subgroups"): per cell, the mean over the findings it scores, then
    each finding's AUROC and gap to the overall AUROC; cells too small to score say why."""
    sub = rep.get("subgroups")
    if not sub:
        return []
    pct = f"{100 * sub.get('confidence', rep['auroc']['confidence']):.0f}%"
    lines = ["", "## Subgroups", ""]
    if sub["attributes"]:
        lines += [f"AUROC per cell with {pct} CIs, and its gap to the overall AUROC (cell - overall) with a {pct} CI "
                  f"paired on the same {sub['resamples']:,} patient resamples as the overall CI. Unknown values are "
                  f"a cell of their own. A cell scores a finding with at least {sub['min_count']} positive and "
                  f"{sub['min_count']} negative images. A gap in bold has an interval excluding 0; the intervals "
                  "are per cell and finding, not simultaneous, so some will exclude 0 by chance. \"all\" is the "
                  "mean over the findings the cell scores, its gap against the overall mean of the same findings."]
    for attribute, every in sub["attributes"].items():
        lines += ["", f"### {attribute.capitalize()}", "",
                  ", ".join(f"{cell}: {c['images']:,} image{'s' * (c['images'] != 1)} of {c['patients']:,} "
                            f"patient{'s' * (c['patients'] != 1)}" for cell, c in every.items()) + ".", ""]
        cells = {cell: c for cell, c in every.items() if c["images"]}  # an empty cell is in the line above only
        rows = []
        for cell, c in cells.items():
            m, least = c["mean"], sub["min_count"]
            rows.append(["all", cell, "–", f"not scored: no finding has {least} positive and {least} negative images"
                         if m["auroc"] is None else _interval(m, "auroc", "low", "high") + f" ({m['findings']})",
                         _gap(m)])
        for name in rep["auroc"]["findings"]:
            for i, (cell, c) in enumerate(cells.items()):
                f = c["findings"][name]
                rows.append([name if i == 0 else "", cell, f"{f['positives']:,}/{f['negatives']:,}",
                             _interval(f, "auroc", "low", "high") if f["auroc"] is not None else
                             f"not scored: {f['reason']}", _gap(f)])
        lines += _table(["finding", attribute, "pos/neg", f"AUROC [{pct} CI]", f"gap [{pct} CI]"], "llrll", rows)
    for attribute, why in sub.get("skipped", {}).items():
        lines += ["", f"{attribute.capitalize()}: not analysed, {why}."]
    return lines


def comparison(rep: dict) -> list[str]:
    """`--against`'s paired comparison (report.json's "comparison"): the mean difference, then per finding."""
    c = rep.get("comparison")
    if not c:
        return []
    pct, m = f"{100 * c['confidence']:.0f}%", c["mean"]
    head = (f"Against `{c['against']}` on their {c['images']:,} common images of {c['patients']:,} patients "
            f"({c['left_out']} without its prediction left out): mean AUROC {_num(m['b'])} here, {_num(m['a'])} "
            f"there, difference " + ("undefined" if m["difference"] is None else _interval(m, "difference", "low",
                                                                                            "high", "+"))
            + f" ({pct} CI, {c['resamples']:,} paired resamples of patients, as `cxr promote` compares).")
    rows = [[n, _num(f["b"]), _num(f["a"]), "–" if f["difference"] is None else _interval(f, "difference", "low",
                                                                                            "high", "+")]
            for n, f in c["findings"].items()]
    return ["", "## Comparison", "", head, "", *_table(["finding", "AUROC here", "AUROC there",
                                                         f"difference [{pct} CI]"], "lrrr", rows)]


def console(rep: dict) -> str:
    """The evaluation as `cxr evaluate` prints it: per finding AUROC [CI], AUPRC, ECE, the mean, what was not
    scored (another dataset's label set) and why."""
    data, au = rep["data"], rep["auroc"]
    width = max([20, *(len(n) + 2 for n in au["findings"])])
    pct = f"{100 * au['confidence']:g}%"
    lines = [f"{rep['model']['uri']} on {data['split']} of {data['uri']}: {data['images']:,} images of "
             f"{data['patients']:,} patients",
             f"{'finding':<{width}}{'AUROC':>8}  {pct} CI (patients)   {'AUPRC':>6}  {'ECE':>6}"]
    mapped = rep.get("label_map") or {}
    for name, a in au["findings"].items():
        f = rep["findings"].get(name)
        if a["auroc"] is None:
            lines.append(f"{name:<{width}}{'undefined':>8}  {a['reason']}")
            continue
        auprc = "–" if not f or f["auprc"] is None else f"{f['auprc']:.3f}"
        ece = "–" if not f or f["calibration"]["ece"] is None else f"{f['calibration']['ece']:.3f}"
        scored_as = f"  (data: {mapped[name]})" if mapped.get(name, name) != name else ""
        lines.append(f"{name:<{width}}{a['auroc']:>8.4f}  [{a['low']:.4f}, {a['high']:.4f}]   {auprc:>6}  {ece:>6}"
                     + scored_as)
    mean = au["mean"]
    if mean["auroc"] is not None:
        lines.append(f"{'mean':<{width}}{mean['auroc']:>8.4f}  [{mean['low']:.4f}, {mean['high']:.4f}]")
    if rep.get("comparison"):
        c = rep["comparison"]["mean"]
        lines.append(f"against {rep['comparison']['against']}: mean AUROC difference "
                     + ("undefined" if c["difference"] is None else _interval(c, "difference", "low", "high", "+"))
                     + f" on {rep['comparison']['images']:,} common images")
    for side in ("model", "data"):
        names = [u["finding"] for u in rep.get("unscored", []) if u["side"] == side]
        if names:
            lines.append(f"not scored ({'no label in the data' if side == 'model' else 'no model output'}): "
                         + ", ".join(names) + " (reasons in report.md)")
    return "\n".join(lines)
