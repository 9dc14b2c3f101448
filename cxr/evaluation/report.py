"""What a person reads after a run: the per-finding AUROC table (figures are `cxr.evaluation.figures`)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

from cxr import labels


def auroc_text(columns: Mapping[str, Mapping[str, float | None]]) -> str:
    """A fixed-width table, one column per split (e.g. val, test), findings two to a row so it fits a screen,
    then the mean."""
    def row(finding: str) -> str:
        cells = [columns[n].get(finding) for n in columns]
        return f"{finding:<19}" + "".join(f"{'undef':>9}" if v is None or (isinstance(v, float) and math.isnan(v))
                                          else f"{v:>9.4f}" for v in cells)

    head = f"{'finding':<19}" + "".join(f"{n:>9}" for n in columns)
    rows = [row(f) for f in labels.FINDINGS]
    pairs = [f"{a}   {b}".rstrip() for a, b in itertools.zip_longest(rows[0::2], rows[1::2], fillvalue="")]
    return "\n".join([f"{head}   {head}", *pairs, row("mean")])


def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _ci(d: dict) -> str:
    return "undefined" if d.get("auroc") is None else f"{d['auroc']:.3f} [{_num(d['low'])}, {_num(d['high'])}]"


def markdown(rep: dict) -> str:
    """The evaluation report as Markdown: what was scored, the per-finding table, the anchors, the fine print."""
    au, data, model = rep["auroc"], rep["data"], rep["model"]
    pct = f"{100 * au['confidence']:.0f}%"
    reg = model.get("registered")
    lines = [f"# Evaluation of {model['uri']}" + (f" ({reg['name']} version {reg['version']})" if reg else ""), "",
             f"Split **{data['split']}** of `{data['uri']}`: {data['images']:,} images of {data['patients']:,} "
             f"patients (data fingerprint `{data['fingerprint'][:16]}…`)."
             + (f" {data['unreadable_images']} unreadable images were left out." if data["unreadable_images"] else ""),
             "",
             f"**Mean AUROC {_ci(au['mean'])}** ({pct} CI, {au['resamples']:,} bootstrap resamples of patients, "
             f"seed {au['seed']}). Thresholds were chosen on the {data['threshold_split']} split and applied "
             "unchanged here.", "",
             "| finding | AUROC [" + pct + " CI] | AUPRC | prevalence | Youden threshold | sensitivity | "
             "specificity | PPV | NPV | F1 | threshold for sensitivity 0.9 | specificity there | ECE |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for name in labels.FINDINGS:
        a, f = au["findings"][name], rep["findings"][name]
        y, s = f.get("at_youden") or {}, f.get("at_sensitivity") or {}
        th = f["thresholds"]
        lines.append(f"| {name} | {_ci(a)} | {_num(f['auprc'])} | {_num(f['prevalence'], 4)} | {_num(th['youden'])} | "
                     f"{_num(y.get('sensitivity'))} | {_num(y.get('specificity'))} | {_num(y.get('ppv'))} | "
                     f"{_num(y.get('npv'))} | {_num(y.get('f1'))} | {_num(th['at_sensitivity'])} | "
                     f"{_num(s.get('specificity'))} | {_num(f['calibration']['ece'])} |")
        for why in (a.get("reason"), f.get("auprc_reason"), th.get("reason")):
            if why:
                notes.append(f"- {name}: {why}.")
    lines += ["", "Published mean AUROCs for orientation (other models, other test sets):", "",
              "| model | split | mean AUROC |", "|---|---|---:|"]
    lines += [f"| {a['model']} | {a['split']} | {a['mean_auroc']:.3f} |" for a in rep["anchors"]]
    if notes:
        lines += ["", "Undefined values:", "", *dict.fromkeys(notes)]
    lines += ["", "PPV and NPV depend on prevalence: they hold for a population with this split's prevalence. "
              "ECE is the image-weighted mean gap between predicted probability and observed frequency over 10 "
              "equal-width bins (see reliability.png)."]
    return "\n".join(lines) + "\n"
