"""Experiment configs (``configs/``) and the benchmark scripts, run as ``python -m experiments.NAME``."""
