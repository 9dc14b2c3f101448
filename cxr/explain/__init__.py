"""Explanations of predictions: Grad-CAM heatmaps, overlays, and boxes scored as Wang et al. 2017 did."""
