"""Slow, obviously-correct retention, written straight from the definition (docs/retention.md §4).

For tests only. It materializes every weight γ^(n−m) with ``jnp.power`` (not the exponent-and-mask
route of the fast forms), builds c_n as an explicit cumulative sum of powers, and never splits the
sequence into chunks. Packed documents (``segment_ids``) are cut apart and each one is run alone, as its
own sequence. Differentiable, so gradients can be compared too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def retention(q, k, v, log_decay, *, kv=None, start=0, normalize=True, segment_ids=None):
    """o_n = [Σ_{m≤n} γ^(n−m) (q_n·k_m) v_m + γ^(n+1) q_n S_0] / sqrt(c_{start+n}).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; log_decay: [H]; kv: the state S_0 [B, H, K, V] or None;
        start: the absolute position of the first token (an int, the same for every row).
        segment_ids: [B, T] concrete integers (not traced) or None. Each row is cut where the id changes;
            the first piece continues ``kv`` and ``start``, every later one runs alone from an empty state
            at position 0.

    Returns:
        (o [B, T, H, V], final state [B, H, K, V]), in q's dtype promoted to at least float32.
    """
    if segment_ids is not None:
        return _packed(q, k, v, log_decay, kv, start, normalize, np.asarray(segment_ids))
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    gamma = jnp.exp(log_decay.astype(dtype))  # [H]
    length = q.shape[1]
    if kv is None:
        kv = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), dtype)
    kv = kv.astype(dtype)

    n = jnp.arange(length)[:, None]
    m = jnp.arange(length)[None, :]
    causal = (m <= n).astype(dtype)  # [T, S]
    weight = jnp.power(gamma[:, None, None], jnp.maximum(n - m, 0)) * causal  # [H, T, S]
    scores = jnp.einsum("BTHK,BSHK->BHTS", q, k)
    o = jnp.einsum("BHTS,HTS,BSHV->BTHV", scores, weight, v)
    o = o + jnp.einsum("BTHK,TH,BHKV->BTHV", q, jnp.power(gamma, n + 1), kv)
    if normalize:
        positions = start + jnp.arange(length)
        powers = jnp.power(gamma, jnp.arange(start + length)[:, None])  # [start+T, H]
        c = jnp.cumsum(powers, axis=0)[positions]  # c_n = Σ_{j=0..n} γ^j, [T, H]
        o = o / jnp.sqrt(c)[None, :, :, None]

    final = jnp.power(gamma, length)[:, None, None] * kv
    final = final + jnp.einsum("SH,BSHK,BSHV->BHKV", jnp.power(gamma, length - 1 - m[0][:, None]), k, v)
    return o, final


# Each document alone, compiled once per length (op-by-op execution would compile every op per length).
_compiled = jax.jit(retention, static_argnames=("start", "normalize"))


def _packed(q, k, v, log_decay, kv, start, normalize, segment_ids):
    """``retention`` row by row and document by document, each document alone; outputs concatenated."""
    outputs, finals = [], []
    for row in range(q.shape[0]):
        cuts = [0, *(np.flatnonzero(segment_ids[row, 1:] != segment_ids[row, :-1]) + 1), q.shape[1]]
        pieces = []
        final = None if kv is None else kv[row : row + 1]
        for index, (begin, end) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
            first = index == 0
            o, final = _compiled(
                *(x[row : row + 1, begin:end] for x in (q, k, v)),
                log_decay,
                kv=final if first else None,
                start=start if first else 0,
                normalize=normalize,
            )
            pieces.append(o)
        outputs.append(jnp.concatenate(pieces, axis=1))
        finals.append(final)
    return jnp.concatenate(outputs, axis=0), jnp.concatenate(finals, axis=0)
