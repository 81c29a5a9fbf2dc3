"""The public retention API: the three forms as pure functions of arrays.

    from retnet_jax import retention
    o = retention.parallel(q, k, v, log_decay)
    o, state = retention.chunkwise(q, k, v, log_decay, chunk_size=64, implementation="auto")
    o, state = retention.recurrent(q, k, v, log_decay)
    o_t, state = retention.recurrent_step(q_t, k_t, v_t, log_decay, state)

Packed documents: every form takes ``segment_ids`` [B, T] (a change between t − 1 and t starts a new
document at t: the state is emptied and positions restart there); ``document_positions`` gives the
positions inside the documents (for the rotation), ``reset_rows`` / ``recurrent_step(reset=)`` start a
new document at a call's position 0.

The maths lives in ``retnet_jax.ops.retention`` (the XLA forms; its docstring defines the axis letters
and the numerics) and ``chunkwise`` goes through ``retnet_jax.ops.dispatch``, which picks the pure-JAX
form or a fused kernel.
"""

from retnet_jax.ops.dispatch import IMPLEMENTATIONS, chunkwise
from retnet_jax.ops.retention import (
    DECAY_SCHEDULES,
    RetentionState,
    document_positions,
    init_state,
    log_decays,
    parallel,
    recurrent,
    recurrent_step,
    reset_rows,
    update_state,
)

__all__ = [
    "DECAY_SCHEDULES",
    "IMPLEMENTATIONS",
    "RetentionState",
    "chunkwise",
    "document_positions",
    "init_state",
    "log_decays",
    "parallel",
    "recurrent",
    "recurrent_step",
    "reset_rows",
    "update_state",
]
