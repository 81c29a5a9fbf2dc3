"""The parts of ``experiments/bench_inference.py``: its flags and plan (``plan``), the measurements a
worker process makes (``worker``), the parent that starts the workers (``runner``), the figures derived
from the rows (``analysis``) and the report (``report``)."""
