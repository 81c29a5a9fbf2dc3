"""Multi-host start-up: ``jax.distributed.initialize`` from flags or the environment."""

from __future__ import annotations

import jax


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None):
    """Joins the processes of a multi-host run; does nothing for a single process.

    ``coordinator_address="auto"`` lets JAX read the cluster from its environment (SLURM, Open MPI,
    TPU pods, ...). CPU runs (tests, laptops) use gloo for cross-process collectives.
    """
    if not coordinator_address:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError(
                "--num_processes/--process_id were given without --coordinator_address=HOST:PORT."
            )
        return
    if jax.config.jax_platforms in ("cpu",) or str(jax.config.jax_platforms).startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address == "auto":
        jax.distributed.initialize()
        return
    if num_processes is None or process_id is None:
        raise ValueError(
            "--coordinator_address needs --num_processes and --process_id (or the environment "
            "variables RETNET_NUM_PROCESSES and RETNET_PROCESS_ID)."
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id must be in [0, {num_processes}); got {process_id}.")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
