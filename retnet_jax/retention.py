"""The public retention API: the three forms as pure functions of arrays.

    from retnet_jax import retention
    o = retention.parallel(q, k, v, log_decay)
    o, state = retention.chunkwise(q, k, v, log_decay, chunk_size=64, implementation="auto")
    o, state = retention.recurrent(q, k, v, log_decay)
    o_t, state = retention.recurrent_step(q_t, k_t, v_t, log_decay, state)

The maths lives in ``retnet_jax.ops.retention`` (the XLA forms; its docstring defines the axis letters
and the numerics) and ``chunkwise`` goes through ``retnet_jax.ops.dispatch``, which picks the pure-JAX
form or a fused kernel.
"""

from retnet_jax.ops.dispatch import IMPLEMENTATIONS, chunkwise
from retnet_jax.ops.retention import (
    DECAY_SCHEDULES,
    RetentionState,
    init_state,
    log_decays,
    parallel,
    recurrent,
    recurrent_step,
    update_state,
)

__all__ = [
    "DECAY_SCHEDULES",
    "IMPLEMENTATIONS",
    "RetentionState",
    "chunkwise",
    "init_state",
    "log_decays",
    "parallel",
    "recurrent",
    "recurrent_step",
    "update_state",
]
