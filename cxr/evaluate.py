"""Scoring a finished run: the best checkpoint's predictions on a split, in one process.

Validation during training is gathered across workers (cxr.train); the final test score is computed once,
on the driver, from the checkpoint Ray kept as best by validation mean AUROC.
"""

from __future__ import annotations

import os

import numpy as np

from cxr import config as cfgmod
from cxr.labels import NUM_FINDINGS
from cxr.metrics import auroc_per_finding, auroc_table, mean_auroc


def predict_split(checkpoint_dir: str, cfg: cfgmod.Config, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [N, 14], labels [N, 14]) of every image of `split`, in split order."""
    import keras

    from cxr import pipeline
    from cxr.checkpoints import MODEL_FILE
    from cxr.models import build_model

    keras.mixed_precision.set_global_policy(cfg.scaling.precision if not cfg.scaling.use_gpu else "float32")
    model = build_model(cfg.model.name, cfg.data.image_size, cfg.model.dropout)
    model.load_weights(os.path.join(checkpoint_dir, MODEL_FILE))
    n = pipeline.split_size(cfg.data.manifest_uri, split)
    batch = cfg.optim.eval_batch_size or 2 * cfg.optim.batch_size
    data = pipeline.make_dataset(cfg.data.manifest_uri, split, batch, training=False, seed=cfg.data.seed,
                                 image_size=cfg.data.image_size)
    probs = np.full((n, NUM_FINDINGS), np.nan, np.float32)
    labels = np.zeros((n, NUM_FINDINGS), np.float32)
    seen = np.zeros(n, np.int64)
    predict = model.predict_on_batch
    for images, y, index in data:
        idx = index.numpy()
        probs[idx] = np.asarray(predict(images), np.float32)
        labels[idx] = y.numpy()
        seen[idx] += 1
    if not (seen == 1).all():
        raise RuntimeError(f"{split}: {int((seen == 0).sum())} images unseen, {int((seen > 1).sum())} seen twice")
    return probs, labels


def score(probs: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """Per-finding AUROC (None where undefined) and their mean, keyed by finding name and 'mean'."""
    aurocs = auroc_per_finding(labels, probs)
    out = auroc_table(aurocs)
    mean = mean_auroc(aurocs)
    out["mean"] = None if np.isnan(mean) else float(mean)
    return out
