"""Synthetic ChestX-ray14: NIH's exact file layout, filled with procedurally drawn chest-radiograph phantoms.

Why: the real release is 45 GB and cannot live in a test or a CI job, yet every stage (metadata, shards,
training, evaluation) must run end to end on data shaped exactly like it, quirks included (`messy=True`).
Each of the 14 findings has its own localized, visually distinct signature drawn where it plausibly sits,
so a small CNN can learn all of them and a pipeline bug shows up as a metric drop rather than noise.
`phantom` draws one image (anatomy, findings, exposure); `layout` writes the NIH root; `layouts` (with
`tables`) the same phantoms in CheXpert's, MIMIC-CXR-JPG's, PadChest's and the `csv` template's layouts.
"""

from cxr.synth.layout import synthesize
from cxr.synth.layouts import LAYOUTS
from cxr.synth.layouts import synthesize as synthesize_layout
from cxr.synth.phantom import BOXED, render

__all__ = ["BOXED", "LAYOUTS", "render", "synthesize", "synthesize_layout"]
