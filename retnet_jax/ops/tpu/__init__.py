"""The TPU path of chunkwise retention: when the Pallas TPU kernels run, and the wrapper around them.

``ops.dispatch.chunkwise`` asks ``select`` first; when it names a chunk size, ``chunkwise`` here computes
the whole function (kernels for the retention itself, XLA for the row factors and the count):

* ``implementation="pallas_tpu"`` forces the kernels of ``chunk_retention``: on a TPU compiled by Mosaic,
  on the CPU through the Pallas TPU interpreter (how the tests check them). Anything that cannot run them
  raises a one-line ``ValueError`` naming the reason: a JAX without ``jax.experimental.pallas.tpu``,
  another backend (a GPU has its own kernels, ``"pallas"``), or an unsupported dtype or chunk size.
* ``implementation="auto"`` takes them on a TPU backend at ``AUTO_CHUNK`` whatever C the caller names
  (C only blocks the computation: every C gives the same function), for bfloat16 and float32 inputs,
  and leaves everything else to the XLA form. On a JAX without Pallas TPU it warns once and uses XLA.

With ``segment_ids`` (packed documents) both choices hold as without: the kernels empty the state at
each document start, and the row factors and the final count follow the positions inside documents.

Under a device mesh the kernels run inside ``jax.shard_map`` with the batch split over every mesh axis
larger than one (the kernel call itself has no partitioning rule, so without it XLA would gather the
operands onto every device). That matches data- and fsdp-parallel meshes exactly; a tensor-parallel mesh
(heads split) gets its activations resharded around the call. A batch that those axes do not divide
keeps the XLA form under "auto".
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from retnet_jax.ops import documents, retention

try:
    from retnet_jax.ops.tpu import chunk_retention
except ImportError as error:  # a JAX without jax.experimental.pallas.tpu (or a broken one)
    chunk_retention = None
    MISSING = f"jax.experimental.pallas.tpu does not import here ({type(error).__name__}: {error})"
else:
    MISSING = None

__all__ = ["IMPLEMENTATION", "chunkwise", "select"]

IMPLEMENTATION = "pallas_tpu"

_warned = False


def _warn_missing():
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"chunkwise(implementation='auto'): {MISSING}; retention runs in the XLA form on this TPU.",
            stacklevel=4,
        )


def _batch_axes(batch: int) -> tuple[str, ...] | None:
    """Mesh axes to split the batch over in ``shard_map``: () with no mesh (or one device), None when
    the batch does not divide among them. Axes already manual (inside a shard_map) are left alone."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    manual = jax.sharding.AxisType.Manual
    axes = tuple(
        name
        for name, size, kind in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types, strict=True)
        if size > 1 and kind != manual
    )
    return axes if batch % math.prod(mesh.shape[name] for name in axes) == 0 else None


def select(fn: str, implementation: str, q, v, chunk_size: int) -> int | None:
    """The chunk size the TPU kernels run with, or None to leave the call to the other implementations.

    Raises:
        ValueError: ``implementation="pallas_tpu"`` where the kernels cannot run (the message says why).
    """
    backend = jax.default_backend()
    if implementation == IMPLEMENTATION:
        if chunk_retention is None:
            raise ValueError(f"{fn}: implementation='pallas_tpu' cannot run: {MISSING}; use 'xla'.")
        if backend not in ("tpu", "cpu"):
            raise ValueError(
                f"{fn}: implementation='pallas_tpu' runs on a TPU (or interpreted on the CPU, for tests), "
                f"not on backend {backend!r}; use 'auto', 'pallas' or 'xla'."
            )
        reason = chunk_retention.supported(q.shape, v.shape, chunk_size, q.dtype)
        if reason is not None:
            raise ValueError(
                f"{fn}: implementation='pallas_tpu' does not support {reason}; use 'xla' or 'auto'."
            )
        return chunk_size
    if implementation != "auto" or backend != "tpu":
        return None
    if chunk_retention is None:
        _warn_missing()
        return None
    size = chunk_retention.AUTO_CHUNK
    fits = chunk_retention.supported(q.shape, v.shape, size, q.dtype) is None
    return size if fits and _batch_axes(q.shape[0]) is not None else None


def chunkwise(q, k, v, log_decay, *, chunk_size: int, state=None, normalize: bool = True, segment_ids=None):
    """``ops.retention.chunkwise`` through the TPU kernels (arguments and results as there).

    The kernels take the incoming state and return the final one; the row factors 1/sqrt(c_n) follow
    from the state's count and are applied here. With ``segment_ids`` the kernels empty the state at each
    document start, and the positions (hence c_n and the final count) restart there.
    """
    batch, length, heads, key_dim = q.shape
    if state is None:
        state = retention.init_state(batch, heads, key_dim, v.shape[-1])
    log_decay = log_decay.astype(jnp.float32)
    if segment_ids is not None:
        return _chunkwise_documents(q, k, v, log_decay, chunk_size, state, normalize, segment_ids)

    def run(q, k, v, log_decay, kv):
        return chunk_retention.chunk_retention(
            q, k, v, log_decay, kv, chunk_size=chunk_size, interpret=jax.default_backend() != "tpu"
        )

    axes = _batch_axes(batch)
    if axes:
        rows = PartitionSpec(axes)
        run = jax.shard_map(
            run, in_specs=(rows, rows, rows, PartitionSpec(), rows), out_specs=(rows, rows), check_vma=False
        )
    o, kv = run(q, k, v, log_decay, state.kv.astype(jnp.float32))
    if normalize:
        scale = retention.row_factors(state.count[:, None] + jnp.arange(length), log_decay)  # [B, T, H]
        o = (o.astype(jnp.float32) * scale[..., None]).astype(v.dtype)
    return o, retention.RetentionState(kv, state.count + length)


def _chunkwise_documents(q, k, v, log_decay, chunk_size, state, normalize, segment_ids):
    """``chunkwise`` with document resets: the kernels mask across starts; positions restart at them."""
    batch, length = q.shape[:2]
    documents.check_segment_ids("chunkwise", segment_ids, batch, length)
    segment_ids = segment_ids.astype(jnp.int32)

    def run(q, k, v, log_decay, kv, segment_ids):
        return chunk_retention.chunk_retention(
            q,
            k,
            v,
            log_decay,
            kv,
            chunk_size=chunk_size,
            segment_ids=segment_ids,
            interpret=jax.default_backend() != "tpu",
        )

    axes = _batch_axes(batch)
    if axes:
        rows = PartitionSpec(axes)
        run = jax.shard_map(
            run,
            in_specs=(rows, rows, rows, PartitionSpec(), rows, rows),
            out_specs=(rows, rows),
            check_vma=False,
        )
    o, kv = run(q, k, v, log_decay, state.kv.astype(jnp.float32), segment_ids)
    positions = documents.document_positions(segment_ids, state.count)  # [B, T]
    if normalize:
        scale = retention.row_factors(positions, log_decay)  # [B, T, H]
        o = (o.astype(jnp.float32) * scale[..., None]).astype(v.dtype)
    return o, retention.RetentionState(kv, positions[:, -1] + 1)
