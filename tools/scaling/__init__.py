"""Scaling ablations: sweeps (``biomedgpt sweep``), their results (``collect``) and power-law fits (``fit-scaling``)."""
