"""Test-split statistics a radiologist can trust: bootstrap CIs, operating points, calibration, figures."""
