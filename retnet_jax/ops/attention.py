"""Causal softmax attention, the Transformer baseline's token mixer, as pure functions of arrays.

Axis letters as in ``ops.retention``; S is a cache's length, U the call's own tokens.

* ``causal_attention``: one call's queries over its own keys, through ``jax.nn.dot_product_attention``
  (cuDNN's flash attention on GPU in half precision, XLA's einsum-softmax elsewhere).
* ``cached_attention``: the call's queries over a cache's tokens and the call's own in one softmax.
* ``write_cache``: the call's keys or values written into a layer-major cache at their positions.

Packed documents: both attention functions take ``segment_ids`` [B, T] (a change between t − 1 and t
starts a document at t; see ``ops.documents``) and then no query attends across a document start. As
in retention, position 0 of a call continues what precedes it (the cache). The rotation positions are the
caller's: rotate by ``documents.document_positions`` so that they restart at each document too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from retnet_jax.ops import documents

__all__ = ["cached_attention", "causal_attention", "write_cache"]


def causal_attention(q, k, v, implementation: str, *, segment_ids=None):
    """Causal softmax attention over one call. q, k, v: [B, T, H, K] → [B, T, H, K] (softmax in float32).

    With ``segment_ids`` [B, T] a query sees only the keys of its own document. ``jax.nn``'s attention
    takes no segment ids (jax 0.10 and 0.11), so they go in as a boolean mask [B, 1, T, S], which both its
    implementations accept (cuDNN turns it into an additive bias; ``is_causal`` still lets it skip the
    upper triangle).
    """
    mask = None
    if segment_ids is not None:
        documents.check_segment_ids("causal_attention", segment_ids, q.shape[0], q.shape[1])
        mask = documents.same_document(segment_ids)[:, None]  # [B, 1, T, S]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)


def cached_attention(q, k, v, k_cache, v_cache, positions, *, segment_ids=None):
    """Attention from the call's queries over the cached tokens and the call's own, in one softmax.

    The cached part and the call's part are scored separately and share one softmax, so the cache is only
    read here (the caller writes the call's keys afterwards) and never concatenated or copied.

    Args:
        q, k, v: [B, T, H, K] the call's rotated queries, keys and values.
        k_cache, v_cache: [B, H, S, K] this layer's cache, holding each row's tokens before the call.
        positions: [B, T] absolute positions of the call's tokens (the row's cache length + 0..T−1).
            Negative positions are left pads: attended by no one (their own output is meaningless).
            These are cache slots, not rotation positions.
        segment_ids: [B, T] or None: a query after a document start sees neither the cache nor the
            call's tokens before that start; the call's first document continues the cached one.

    Returns:
        o [B, T, H, K] in q's dtype (scores, softmax and sums in float32).
    """
    acc = jnp.promote_types(q.dtype, jnp.float32)
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    old = jnp.einsum("BTHK,BHSK->BHTS", q, k_cache, preferred_element_type=acc)  # [B, H, T, S]
    new = jnp.einsum("BTHK,BUHK->BHTU", q, k, preferred_element_type=acc)  # [B, H, T, U], U = T
    cached = jnp.arange(k_cache.shape[2])[None, :] < positions[:, :1]  # [B, S]: filled before the call
    causal = (positions[:, None, :] <= positions[:, :, None]) & (positions[:, None, :] >= 0)  # [B, T, U]
    if segment_ids is not None:
        documents.check_segment_ids("cached_attention", segment_ids, q.shape[0], q.shape[1])
        causal = causal & documents.same_document(segment_ids)
        cached = cached[:, None, :] & documents.continues(documents.document_starts(segment_ids))[..., None]
        cached = cached[:, None]  # [B, 1, T, S]
    else:
        cached = cached[:, None, None, :]  # [B, 1, 1, S]
    floor = jnp.finfo(acc).min  # finite: a query that sees nothing (a pad) gets a finite, unused mix
    old = jnp.where(cached, old, floor)
    new = jnp.where(causal[:, None], new, floor)
    probs = jax.nn.softmax(jnp.concatenate([old, new], axis=-1), axis=-1)  # [B, H, T, S + U]
    p_old, p_new = probs[..., : old.shape[-1]], probs[..., old.shape[-1] :]
    o = jnp.einsum("BHTS,BHSK->BTHK", p_old.astype(v_cache.dtype), v_cache, preferred_element_type=acc)
    o = o + jnp.einsum("BHTU,BUHK->BTHK", p_new.astype(v.dtype), v, preferred_element_type=acc)
    return o.astype(q.dtype)


def write_cache(cache, new, layer, positions):
    """cache [L, B, H, S, K] with new [B, T, H, K] written at (layer, row, positions [B, T]).

    Pads (negative positions) and positions >= S are dropped, not wrapped.
    """
    rows = jnp.arange(positions.shape[0])[:, None]  # [B, 1]
    slots = jnp.where(positions < 0, cache.shape[3], positions)  # [B, T]
    # Indices (layer, rows, :, slots) put the indexed axes first: new goes in as [B, T, H, K].
    return cache.at[layer, rows, :, slots].set(new.astype(cache.dtype), mode="drop")
