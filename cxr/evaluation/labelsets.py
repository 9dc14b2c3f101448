"""Which of a model's outputs score which of a dataset's labels: the same label set, or another one mapped.

A model trained on NIH's 14 findings evaluated on a CheXpert-layout root (external validation) can be scored
only on the findings both label sets name, through the equivalences kept as data (`cxr.data.labelmap`); the
others are listed with the reason, never silently dropped. The report keeps the model's finding names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SharedFindings:
    """Model output columns and data label columns that measure the same finding, in the model's order."""

    names: tuple[str, ...]  # the model's names of the scored findings
    model_index: tuple[int, ...]
    data_index: tuple[int, ...]
    data_names: tuple[str, ...]  # the data's names for them
    unscored: list[dict[str, str]] = field(default_factory=list)  # {"finding", "side", "reason"}

    @property
    def identity(self) -> bool:
        return self.names == self.data_names and not self.unscored

    def take(self, probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and labels of the scored findings only, column for column."""
        return probs[:, list(self.model_index)], labels[:, list(self.data_index)]

    def describe(self) -> dict[str, str] | None:
        """Model name → data name where they differ (None when the label sets are the same)."""
        if self.identity:
            return None
        return dict(zip(self.names, self.data_names, strict=True))


def shared_findings(model: tuple[str, ...], data: tuple[str, ...]) -> SharedFindings:
    """The scoring plan for a model of label set `model` on data labelled with `data`; refuses no overlap."""
    from cxr import labelmap

    if tuple(model) == tuple(data):
        idx = tuple(range(len(model)))
        return SharedFindings(tuple(model), idx, idx, tuple(data))
    pairs = labelmap.shared(list(model), list(data))
    m_index = {n: i for i, n in enumerate(model)}
    d_index = {n: i for i, n in enumerate(data)}
    unscored = [{"finding": n, "side": "model", "reason": f"the data has no label for it: {why}"}
                for n, why in labelmap.reasons(model, data).items()]
    unscored += [{"finding": n, "side": "data", "reason": f"the model has no output for it: {why}"}
                 for n, why in labelmap.reasons(data, model).items()]
    if not pairs:
        raise ValueError(f"the model's findings ({', '.join(model)}) and the data's ({', '.join(data)}) share none: "
                         "nothing to score (equivalences: cxr/labelmap.yaml)")
    return SharedFindings(tuple(m for m, _ in pairs), tuple(m_index[m] for m, _ in pairs),
                          tuple(d_index[d] for _, d in pairs), tuple(d for _, d in pairs), unscored)
