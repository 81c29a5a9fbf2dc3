"""Slow, obviously-correct retention, written straight from the definition (REFERENCE §3).

For tests only. It materializes every weight γ^(n−m) with ``jnp.power`` (not the exponent-and-mask
route of the fast forms), builds c_n as an explicit cumulative sum of powers, and never splits the
sequence. Differentiable, so gradients can be compared too.
"""

from __future__ import annotations

import jax.numpy as jnp


def retention(q, k, v, log_decay, *, kv=None, start=0, normalize=True):
    """o_n = [Σ_{m≤n} γ^(n−m) (q_n·k_m) v_m + γ^(n+1) q_n S_0] / sqrt(c_{start+n}).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; log_decay: [H]; kv: the state S_0 [B, H, K, V] or None;
        start: the absolute position of the first token (an int, the same for every row).

    Returns:
        (o [B, T, H, V], final state [B, H, K, V]), in q's dtype promoted to at least float32.
    """
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
