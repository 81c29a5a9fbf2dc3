"""Test set-up, applied before JAX starts.

* 8 fake CPU devices for the sharding tests.
* Test programs are tiny, so XLA's compile time dominates the suite: compile with the CPU backend's
  cheaper optimization level (results are the same functions; only code quality changes), and keep what
  is compiled in a cache that the run's processes share.
"""

import os
import shutil
import tempfile

# Appended to whatever the environment sets, so the 8 fake devices are there in any case.
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
        "--xla_cpu_use_fusion_emitters=false",
    ]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One XLA compilation cache for the whole run, shared by the worker processes and the scripts the tests
# start (they inherit the environment): the tests compile the same tiny programs many times over. A run
# makes its own (removed at its end), so no run reads another's programs.
_CACHE_CREATED = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE_CREATED = tempfile.mkdtemp(prefix="retnet-jax-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_CREATED
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import pytest  # noqa: E402


def small_config(**overrides):
    """The default experiment shrunk to seconds: 12 steps of 8×32 tokens, everything logged."""
    from retnet_jax.configs.default import get_config

    config = get_config()
    config.update(
        dict(
            seq_len=32,
            batch_size=8,
            steps=12,
            warmup_steps=2,
            log_every=1,
            eval_every=6,
            eval_batches=2,
            checkpoint_every=3,
            sample_tokens=0,
        )
    )
    config.update(overrides)
    return config


def pytest_collection_modifyitems(config, items):
    """The slow tests (marked ``slow``) first, in their order: spread over worker processes, the long
    ones then start early instead of leaving one worker running alone at the end of the suite."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One full run of ``small_config()``: (workdir, config, final state), shared by several tests."""
    from retnet_jax.training import loop

    workdir = str(tmp_path_factory.mktemp("trained"))
    config = small_config()
    state = loop.train_and_evaluate(config, workdir)
    return workdir, config, state


def pytest_unconfigure(config):
    if _CACHE_CREATED is not None:  # the process that made the run's cache (the controller, or -n 0)
        shutil.rmtree(_CACHE_CREATED, ignore_errors=True)
