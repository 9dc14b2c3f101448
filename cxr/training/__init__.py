"""Training: the distributed step, the per-worker loop Ray Train runs, the driver, checkpoints, schedule."""
