"""Test set-up, applied before JAX starts.

* 8 fake CPU devices for the sharding tests.
* Test programs are tiny, so XLA's compile time dominates the suite: compile with the CPU backend's
  cheaper optimization level (results are the same functions; only code quality changes).
"""

import os

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_cpu_use_fusion_emitters=false",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
