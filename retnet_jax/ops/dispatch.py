"""Which implementation runs the chunkwise form: the pure-JAX form of ``ops.retention`` or a fused kernel.

``chunkwise(..., implementation=)`` is the one place that reads the backend and the device mesh:

* ``"xla"``: ``ops.retention.chunkwise``, any backend.
* ``"pallas"``: the fused GPU kernels of ``ops.gpu.chunk_retention`` (through the Pallas interpreter on a
  CPU, which is how the tests check them). Shapes they cannot run raise a ``ValueError`` naming the reason.
* ``"auto"``: the kernels on a GPU where they are measured faster (see ``_fused_chunk``), else XLA.

Every implementation computes the same function: the kernels compute unnormalized retention from an
empty state at position 0, and the wrapper here adds the incoming state's term, the row factors and the
final state in XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from retnet_jax.ops import retention
from retnet_jax.ops.gpu import chunk_retention

__all__ = ["IMPLEMENTATIONS", "chunkwise"]

IMPLEMENTATIONS = ("xla", "pallas", "auto")


def chunkwise(
    q,
    k,
    v,
    log_decay,
    *,
    chunk_size: int,
    state: retention.RetentionState | None = None,
    normalize: bool = True,
    implementation: str = "xla",
    segment_ids=None,
):
    """``ops.retention.chunkwise`` through the implementation named (see the module docstring).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; log_decay: [H] float32.
        chunk_size: C >= 1, a Python int.
        state: carried in (default empty); its count sets the absolute positions.
        normalize: divide row n by sqrt(c_n) or not.
        implementation: "xla", "pallas" or "auto".
        segment_ids: [B, T] integers or None: document starts reset the state (``ops.retention``). The
            fused kernels do not reset yet: "auto" runs the XLA form then, "pallas" raises.

    Returns:
        (o [B, T, H, V] in the input dtype, the state after the last token).
    """
    retention._check_inputs("chunkwise", q, k, v, log_decay, state)
    size = retention._check_chunk_size("chunkwise", chunk_size)
    if segment_ids is not None:
        if implementation == "pallas":
            raise ValueError(
                "chunkwise: implementation='pallas' does not support segment_ids (document resets) yet; "
                "use implementation='xla' or 'auto'."
            )
        implementation = "xla" if implementation == "auto" else implementation
    fused_chunk = _fused_chunk("chunkwise", implementation, q, v, size)
    if fused_chunk is None:
        return retention.chunkwise(
            q, k, v, log_decay, chunk_size=size, state=state, normalize=normalize, segment_ids=segment_ids
        )
    return _fused_chunkwise(q, k, v, log_decay, fused_chunk, state, normalize)


def _fused_chunk(fn: str, implementation: str, q, v, size: int) -> int | None:
    """The chunk size the fused kernels run with, or None for the XLA form.

    The chunk length only blocks the computation (every chunk size gives the same function), so "auto"
    runs the kernels at their own ``chunk_retention.AUTO_CHUNK`` whatever C the caller's config names,
    and only where their whole state tile fits on chip (``chunk_retention.preferred``); measured slower
    than the XLA form otherwise. Under a mesh of several devices "auto" keeps the XLA form: the kernel
    call has no partitioning rule, so XLA would gather its operands onto every device.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{fn}: unknown implementation {implementation!r}; expected one of {IMPLEMENTATIONS}."
        )
    if implementation == "xla":
        return None
    if implementation == "auto":
        chunk = min(size, chunk_retention.AUTO_CHUNK)
        fits = chunk_retention.preferred(q.shape, v.shape, chunk, q.dtype)
        one_device = jax.sharding.get_abstract_mesh().size <= 1
        return chunk if fits and one_device and jax.default_backend() == "gpu" else None
    reason = chunk_retention.supported(q.shape, v.shape, size, q.dtype)
    if reason is not None:
        raise ValueError(
            f"{fn}: implementation='pallas' does not support {reason}; use implementation='xla' or 'auto'."
        )
    return size


def _fused_chunkwise(q, k, v, log_decay, size, state, normalize):
    """chunkwise through the fused kernels: the kernels compute unnormalized retention from an empty state
    at position 0; the incoming state's term, the row factors and the final state are added here."""
    length = q.shape[1]
    interpret = jax.default_backend() == "cpu"
    o = chunk_retention.fused_chunk_retention(q, k, v, log_decay, chunk_size=size, interpret=interpret)
    acc = retention._accumulator(q.dtype)
    log_decay = log_decay.astype(acc)
    incoming = state is not None
    if not incoming:
        state = retention.init_state(q.shape[0], q.shape[2], q.shape[3], v.shape[3], acc)
    state = retention.RetentionState(state.kv.astype(acc), state.count)
    if incoming or normalize:
        o = o.astype(acc)
        if incoming:  # S_0 decayed to each position: o_n += γ^(n+1) q_n S_0
            q_decayed = q * retention._powers(jnp.arange(1, length + 1), log_decay)[None, ..., None]
            o = o + jnp.einsum("BTHK,BHKV->BTHV", q_decayed.astype(acc), state.kv)
        if normalize:
            o = o * retention._row_scale(state.count[:, None] + jnp.arange(length), log_decay)[..., None]
        o = o.astype(v.dtype)
    return o, retention.update_state(k, v, log_decay, state)
