"""Packed documents: segment ids → document starts, positions inside documents and same-document masks.

Training packs documents back to back into rows. A row's ``segment_ids`` [B, T] (any integers) tells them
apart: **where the value changes between t − 1 and t, a new document starts at t**. Only changes count, so
ids may repeat further along a row ([1, 1, 2, 2, 1] holds three documents) and any numbering works
(grain's packer numbers 1, 2, ... per row; 0 marks padding, itself a document of its own).

Position 0 of a call is never a document start: the call's first document continues whatever precedes
it (the incoming recurrent state, or the cache), and with nothing before it, it starts there anyway. A
caller who wants a row to start a new document at position 0 of a call that carries a state empties that
row's state first (``retention.reset_rows``; ``recurrent_step(reset=)`` for one token).

Inside the package a call's documents are described by ``starts`` [B, T] bool, True at each document's
first token; unlike segment ids, ``starts`` may be True at position 0, which is how the chunkwise form
hands a start that falls on a chunk boundary to the next piece of the sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["check_segment_ids", "document_positions", "document_starts", "same_document"]


def check_segment_ids(fn: str, segment_ids, batch: int, length: int) -> None:
    """Raises a ValueError unless segment_ids is an integer array of shape [B, T] = (batch, length)."""
    shape = tuple(getattr(segment_ids, "shape", ()))
    if shape != (batch, length):
        raise ValueError(
            f"{fn}: segment_ids must have shape [B, T] = ({batch}, {length}), one id per token; "
            f"got shape {shape}."
        )
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(
            f"{fn}: segment_ids must be integers (int32 document ids per token); got {segment_ids.dtype}."
        )


def document_starts(segment_ids) -> jax.Array:
    """True where a document starts: segment_ids[:, t] != segment_ids[:, t − 1]. [B, T] int → [B, T] bool.

    Position 0 is never a start (see the module docstring).
    """
    change = segment_ids[:, 1:] != segment_ids[:, :-1]  # [B, T − 1]
    return jnp.concatenate([jnp.zeros_like(change[:, :1]), change], axis=1)


def first_index(starts) -> jax.Array:
    """Index (in the call) of the first token of each token's document; 0 for the call's first document.

    starts [B, T] bool (optionally the chunk axis too: [B, G, C], then indices run within each chunk).
    """
    index = jnp.arange(starts.shape[-1], dtype=jnp.int32)
    return jax.lax.cummax(jnp.where(starts, index, 0), axis=starts.ndim - 1)


def continues(starts) -> jax.Array:
    """True for the tokens before the call's first start: the document carried in from before the call."""
    return jax.lax.cummax(starts.astype(jnp.int32), axis=starts.ndim - 1) == 0


def positions_from_starts(starts, count=None) -> jax.Array:
    """Steps since each token's document began; the carried-in document continues from ``count`` [B]."""
    index = jnp.arange(starts.shape[-1], dtype=jnp.int32)
    positions = index - first_index(starts)
    if count is not None:
        positions = positions + jnp.where(continues(starts), count[:, None], 0)
    return positions


def document_positions(segment_ids, count=None) -> jax.Array:
    """Each token's position inside its document: the steps since its document started.

    The positions the retention forms use for the normalization count c_n, and the ones the model rotates
    queries and keys by, so that a packed document sees exactly the positions it would see alone.

    Args:
        segment_ids: [B, T] integers; a change between t − 1 and t starts a document at t.
        count: [B] int32, the incoming state's count (tokens already seen of the document the call
            continues), or None for 0. Added to the positions of the call's first document only; a
            negative count (left padding) gives those pads negative positions, as without segment ids.

    Returns:
        [B, T] int32. With one document per row this is ``count[:, None] + arange(T)``, and the state
        after the call has ``count == positions[:, -1] + 1``.
    """
    return positions_from_starts(document_starts(segment_ids), count)


def same_document(segment_ids) -> jax.Array:
    """The causal same-document mask: [B, T] → [B, T, S] bool, True where key m may be seen by query n.

    True for m ≤ n within n's document (m at or after the start of n's document), so attention and
    retention never cross a document start.
    """
    first = first_index(document_starts(segment_ids))  # [B, T]
    index = jnp.arange(segment_ids.shape[1])
    return (index[None, None, :] >= first[:, :, None]) & (index[None, None, :] <= index[None, :, None])
