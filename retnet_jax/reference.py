"""Slow, obviously-correct retention, written straight from the definition (REFERENCE §3).

For tests only: a Python loop over query positions, powers of γ by ``jnp.power`` (not the exponents
the fast forms use), the normalizer by an explicit sum. Differentiable, so gradients can be compared.
"""

from __future__ import annotations

import jax.numpy as jnp


def retention(q, k, v, log_decay, *, kv=None, start=0, normalize=True):
    """o_n = [Σ_{m≤n} γ^(n−m) (q_n·k_m) v_m + γ^(n+1) q_n S_0] / sqrt(c_{start+n}).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; log_decay: [H]; kv: the state S_0 [B, H, K, V] or None;
        start: the absolute position of the first token (an int, the same for every row).

    Returns:
        (o [B, T, H, V], final state [B, H, K, V]), both in q's dtype promoted to at least float32.
    """
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    gamma = jnp.exp(log_decay.astype(dtype))  # [H]
    batch, length, heads, _ = q.shape
    if kv is None:
        kv = jnp.zeros((batch, heads, q.shape[-1], v.shape[-1]), dtype)
    kv = kv.astype(dtype)

    outputs = []
    for n in range(length):
        o_n = jnp.einsum("BHK,BHKV->BHV", q[:, n] * jnp.power(gamma, n + 1)[:, None], kv)
        for m in range(n + 1):
            score = jnp.sum(q[:, n] * k[:, m], axis=-1)  # [B, H]
            o_n = o_n + (jnp.power(gamma, n - m) * score)[..., None] * v[:, m]
        if normalize:
            c_n = sum(jnp.power(gamma, j) for j in range(start + n + 1))  # [H]
            o_n = o_n / jnp.sqrt(c_n)[:, None]
        outputs.append(o_n)

    final = jnp.power(gamma, length)[:, None, None] * kv
    for m in range(length):
        decay = jnp.power(gamma, length - 1 - m)[:, None, None]
        final = final + decay * jnp.einsum("BHK,BHV->BHKV", k[:, m], v[:, m])
    return jnp.stack(outputs, axis=1), final
