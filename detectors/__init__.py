"""Bundled anomaly detectors (Dinomaly, CRAS, RealNet) and the one metric suite.

Usable without curate's pipeline: they read an MVTec-layout export. The detectors arrive with
issue 7 (Dinomaly, CRAS, metrics, `curate bench`) and issue 8 (RealNet).
"""
