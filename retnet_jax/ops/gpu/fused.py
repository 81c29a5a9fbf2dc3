"""Chunk retention through the fused kernels: one differentiable op over both kernel families.

``chunk_retention(q, k, v, log_decay, h0, plan=...)`` computes unnormalized retention continuing the state
h0 and returns the output and the final state,

    o_n = Σ_{m ≤ n} γ^(n−m) (q_n · k_m) v_m + γ^(n+1) q_n h0,     ht = γ^T h0 + Σ_m γ^(T−1−m) k_mᵀ v_m,

differentiable in q, k, v, log γ and h0. The row factors 1/sqrt(c_n) of normalized retention and the
positions live with the caller (``ops.dispatch``). Here: padding (T to a multiple of C, K and V to what
the family takes: zero rows and columns change nothing, and the kernels give the last chunk its true
length), the custom gradient (the family's backward kernels; ∂L/∂log γ from the moment identity of
``common.log_decay_gradient``) and the partitioning rule of each kernel call (``partition``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from retnet_jax.ops.gpu import chunk_retention, common, partition, split_retention
from retnet_jax.ops.gpu import plan as plan_lib

__all__ = ["chunk_retention"]

_FAMILY = {"register": chunk_retention, "split": split_retention}

# Axes of the kernel calls' operands (partition.py): b, h kept sharded; the others whole.
_SEQ_K, _SEQ_V, _STATE = "b t h k", "b t h v", "b h k v"
_FORWARD_IN = ("h", _SEQ_K, _SEQ_K, _SEQ_V, _STATE)
_FORWARD_OUT = (_SEQ_V, _STATE)
_BACKWARD_IN = (*_FORWARD_IN, _SEQ_V, _STATE)
_BACKWARD_OUT = (_SEQ_K, _SEQ_K, _SEQ_V, _STATE)


def _kernels(plan: plan_lib.Plan, length: int, interpret: bool):
    """(forward, backward) of the plan's family as hashable callables of arrays."""
    module = _FAMILY[plan.family]
    static = dict(size=plan.chunk, length=length, tiles=plan.tiles, interpret=interpret)

    def forward(log_decay, q, k, v, h0):
        return tuple(module.forward(q, k, v, log_decay, h0, **static))

    def backward(log_decay, q, k, v, h0, do, dht):
        return tuple(module.backward(q, k, v, log_decay, h0, do, dht, **static))

    return forward, backward


_kernels = functools.cache(_kernels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _op(q, k, v, log_decay, h0, plan, length, interpret):
    forward, _ = _kernels(plan, length, interpret)
    return partition.call(forward, _FORWARD_IN, _FORWARD_OUT, log_decay, q, k, v, h0)


def _op_fwd(q, k, v, log_decay, h0, plan, length, interpret):
    o, ht = _op(q, k, v, log_decay, h0, plan, length, interpret)
    return (o, ht), (q, k, v, log_decay, h0, ht)


def _op_bwd(plan, length, interpret, residuals, cotangents):
    q, k, v, log_decay, h0, ht = residuals
    do, dht = cotangents
    _, backward = _kernels(plan, length, interpret)
    dq, dk, dv, dh0 = partition.call(
        backward,
        _BACKWARD_IN,
        _BACKWARD_OUT,
        log_decay,
        q,
        k,
        v,
        h0,
        do.astype(v.dtype),
        dht.astype(jnp.float32),
    )
    dlog_decay = common.log_decay_gradient(q, k, dq, dk, h0, dh0, ht, dht, length)
    return dq, dk, dv, dlog_decay.astype(log_decay.dtype), dh0


_op.defvjp(_op_fwd, _op_bwd)


def chunk_retention(q, k, v, log_decay, h0=None, *, plan: plan_lib.Plan, interpret: bool = False):
    """Unnormalized retention continuing h0, through the kernels of ``plan`` (``plan.make``).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V] (bfloat16, float16 or float32, one dtype); log_decay: [H]
            float32; h0: [B, H, K, V] float32, or None for the empty state.
        plan: the kernel family, chunk length and tiles.
        interpret: run the kernel bodies through the Pallas interpreter (any backend; for tests).

    Returns:
        (o [B, T, H, V] in the input dtype, final state [B, H, K, V] float32).
    """
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    kp, vp = plan_lib.padded_dims(plan, key_dim, value_dim)
    padded = -(-length // plan.chunk) * plan.chunk
    if h0 is None:
        h0 = jnp.zeros((batch, heads, kp, vp), jnp.float32)
    else:
        h0 = jnp.pad(h0.astype(jnp.float32), [(0, 0), (0, 0), (0, kp - key_dim), (0, vp - value_dim)])

    def pad(x, width):
        extra = [(0, 0), (0, padded - length), (0, 0), (0, width - x.shape[-1])]
        return jnp.pad(x, extra) if any(e for _, e in extra) else x

    o, ht = _op(
        pad(q, kp), pad(k, kp), pad(v, vp), log_decay.astype(jnp.float32), h0, plan, length, interpret
    )
    return o[:, :length, :, :value_dim], ht[:, :, :key_dim, :value_dim]
