"""The parts of ``experiments/bench_retention.py``: its flags, shapes and configurations (``sweep``), our
forms and cuDNN timed in the parent (``jax_forms``), fla in a worker process (``fla_peer``), the
correctness and kernel-plan checks (``checks``) and the report (``report``)."""
