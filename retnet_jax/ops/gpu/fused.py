"""Chunk retention through the fused kernels: one differentiable op over both kernel families.

``chunk_retention(q, k, v, log_decay, h0, plan=...)`` computes unnormalized retention continuing the state
h0 and returns the output and the final state,

    o_n = Σ_{m ≤ n} γ^(n−m) (q_n · k_m) v_m + γ^(n+1) q_n h0,     ht = γ^T h0 + Σ_m γ^(T−1−m) k_mᵀ v_m,

differentiable in q, k, v, log γ and h0. With ``starts`` (packed documents) the state is emptied at each
document start: every sum above runs within one document, h0 reaches only the tokens before the first
start, and ht holds the last document alone. The row factors 1/sqrt(c_n) of normalized retention and the
positions live with the caller (``ops.dispatch``). Here: padding (T to a multiple of C, K and V to what
the family takes: zero rows and columns change nothing, and the kernels give the last chunk its true
length), the document starts as the kernels take them, the custom gradient (the family's backward
kernels; ∂L/∂log γ from the moment identity of ``common.log_decay_gradient``, which holds term by term
and so with resets too) and the partitioning rule of each kernel call (``partition``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from retnet_jax.ops import documents
from retnet_jax.ops.gpu import chunk_retention, common, partition, split_retention
from retnet_jax.ops.gpu import plan as plan_lib
from retnet_jax.ops.retention import KERNEL_STATE_NAME

__all__ = ["chunk_retention"]

_FAMILY = {"register": chunk_retention, "split": split_retention}

# Axes of the kernel calls' operands (partition.py): b, h kept sharded; the others whole.
_SEQ_K, _SEQ_V, _STATE, _DOCUMENTS = "b t h k", "b t h v", "b h k v", "b t"
_FORWARD_IN = ("h", _SEQ_K, _SEQ_K, _SEQ_V, _STATE)
_FORWARD_OUT = (_SEQ_V, _STATE)
_BACKWARD_IN = (*_FORWARD_IN, _SEQ_V, _STATE)
_BACKWARD_OUT = (_SEQ_K, _SEQ_K, _SEQ_V, _STATE)


def _kernels(plan: plan_lib.Plan, length: int, interpret: bool):
    """(forward, backward) of the plan's family as hashable callables of arrays; each takes the document
    starts ``first`` [B, T] as an optional last operand."""
    module = _FAMILY[plan.family]
    static = dict(size=plan.chunk, length=length, tiles=plan.tiles, interpret=interpret)

    def forward(log_decay, q, k, v, h0, *first):
        return tuple(module.forward(q, k, v, log_decay, h0, *first, **static))

    def backward(log_decay, q, k, v, h0, do, dht, *first):
        return tuple(module.backward(q, k, v, log_decay, h0, do, dht, *first, **static))

    return forward, backward


_kernels = functools.cache(_kernels)


def _rules(rules, first):
    """The operands' partitioning rules, with the document starts' ("b t") when there are any."""
    return rules if first is None else (*rules, _DOCUMENTS)


def _extra(first):
    return () if first is None else (first,)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _op(q, k, v, log_decay, h0, first, plan, length, interpret):
    forward, _ = _kernels(plan, length, interpret)
    return partition.call(
        forward, _rules(_FORWARD_IN, first), _FORWARD_OUT, log_decay, q, k, v, h0, *_extra(first)
    )


def _op_fwd(q, k, v, log_decay, h0, first, plan, length, interpret):
    o, ht = _op(q, k, v, log_decay, h0, first, plan, length, interpret)
    # Named so that a remat policy can keep it: then the forward kernel need not rerun for the backward.
    return (o, ht), (q, k, v, log_decay, h0, first, checkpoint_name(ht, KERNEL_STATE_NAME))


def _op_bwd(plan, length, interpret, residuals, cotangents):
    q, k, v, log_decay, h0, first, ht = residuals
    do, dht = cotangents
    _, backward = _kernels(plan, length, interpret)
    dq, dk, dv, dh0 = partition.call(
        backward,
        _rules(_BACKWARD_IN, first),
        _BACKWARD_OUT,
        log_decay,
        q,
        k,
        v,
        h0,
        do.astype(v.dtype),
        dht.astype(jnp.float32),
        *_extra(first),
    )
    # Every term of o and ht keeps its power of γ or is masked out, so the identity holds as it is.
    dlog_decay = common.log_decay_gradient(q, k, dq, dk, h0, dh0, ht, dht, length)
    return dq, dk, dv, dlog_decay.astype(log_decay.dtype), dh0, None


_op.defvjp(_op_fwd, _op_bwd)


def document_firsts(starts) -> jax.Array:
    """What the kernels take for packed documents: [B, T] bool → [B, T] int32, the index of the first
    token of each token's document, −1 for the tokens of the document carried in (before any start)."""
    return jnp.where(documents.continues(starts), -1, documents.first_index(starts)).astype(jnp.int32)


def chunk_retention(
    q, k, v, log_decay, h0=None, *, starts=None, plan: plan_lib.Plan, interpret: bool = False
):
    """Unnormalized retention continuing h0, through the kernels of ``plan`` (``plan.make``).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V] (bfloat16, float16 or float32, one dtype); log_decay: [H]
            float32; h0: [B, H, K, V] float32, or None for the empty state.
        starts: [B, T] bool, True at each document's first token (position 0 included: then h0 is not
            seen), or None: no resets, and the kernels are exactly those without documents.
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

    first = None
    if starts is not None:
        if tuple(starts.shape) != (batch, length):
            raise ValueError(
                f"chunk_retention: starts must have shape [B, T] = ({batch}, {length}); "
                f"got {tuple(starts.shape)}."
            )
        # Padded rows repeat the last real one: they join the last document (common.decays).
        first = jnp.pad(document_firsts(starts), [(0, 0), (0, padded - length)], mode="edge")
    o, ht = _op(
        pad(q, kp), pad(k, kp), pad(v, vp), log_decay.astype(jnp.float32), h0, first, plan, length, interpret
    )
    return o[:, :length, :, :value_dim], ht[:, :, :key_dim, :value_dim]
