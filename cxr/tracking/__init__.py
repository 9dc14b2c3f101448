"""Tracking: one MLflow run per training run, epochs logged live by rank 0, models logged for the registry."""
