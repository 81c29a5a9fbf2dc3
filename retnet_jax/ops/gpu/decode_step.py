"""One token of recurrent retention as one fused kernel (Pallas, Triton backend): the decoding step.

Per batch row b and head h, with the state S ∈ ℝ^{K×V} of the tokens before,

    S' = γ S + kᵀ v,        o = (q S') · r,

where r is the row factor 1/sqrt(c_n) of normalized retention at the row's position (1 when unnormalized)
and a row that starts a new document (``reset``) takes S = 0. This is ``ops.retention.recurrent_step``;
the kernel computes it in one pass over the state: every program loads its tile of S once (float32, or a
bfloat16 state widened to float32), updates it in float32, reads o out of the updated tile, and writes
the tile back over S (the state operand and result share one buffer: ``input_output_aliases``). XLA's
form splits the update and the read-out into several fusions, so it reads the state more than once.

Work split: the grid is (V tiles, H, B); one program holds a [K, BV] tile of S, with K whole (o sums over
K) and V cut into tiles of BV columns, so that even a batch of one has B·H·V/BV programs to spread over
the GPU (paper-1.3b's H8 V512 at BV = 32: 128). Loads run along V, the state's contiguous axis: each of
the K rows of a tile is one contiguous run of BV values. Triton wants power-of-two tiles, so K must be a
power of two and BV a power of two dividing V (torchscale's V = 432 runs in tiles of 16).

The per-row scalars (the decay, 0 for a reset row, and r) are computed in XLA from the counts and come
in as a small [B, H, 2, BV] operand (each value repeated along BV), so that the kernel needs no scalar
loads and no reductions besides the one over K.

A decoding state holds every layer's S in one array [L, B, H, K, V]. Given that array and a layer index,
the kernel updates the layer's slice inside it: a slice handed to a kernel would first be copied out of
the array and the result copied back, three passes over the state where one suffices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from retnet_jax.ops import retention
from retnet_jax.ops.gpu import common

__all__ = ["BLOCK_V", "STATE_DTYPES", "decode_step", "factors", "launch", "unsupported", "value_tile"]

# Widest V tile a program takes: 32 float32 columns are a 128-byte run per row of the tile (one cache
# line), and keep 128 programs at B = 1 for H8 V512. A [256, 32] float32 tile is 64 values per thread at
# 4 warps: it stays in registers.
BLOCK_V = 32
NUM_WARPS = 4

# What the state may be stored in (the kernel always computes in float32).
STATE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def value_tile(value_dim: int, block_v: int = BLOCK_V) -> int:
    """BV: the largest power of two <= ``block_v`` that divides V."""
    tile = 1
    while tile * 2 <= block_v and value_dim % (tile * 2) == 0:
        tile *= 2
    return tile


def unsupported(key_dim: int, value_dim: int, dtype, state_dtype) -> str | None:
    """Why the kernel cannot run these shapes and dtypes, or None when it can."""
    if jnp.dtype(dtype) not in common.DTYPES:
        return f"for {jnp.dtype(dtype).name} inputs (it takes {[d.name for d in common.DTYPES]})"
    if jnp.dtype(state_dtype) not in STATE_DTYPES:
        return f"on a {jnp.dtype(state_dtype).name} state (it takes float32 or bfloat16)"
    if not _power_of_two(key_dim):
        return f"at K = {key_dim} (Triton tiles are powers of two, and K is one tile)"
    if value_tile(value_dim) < 4:
        return f"at V = {value_dim} (no power-of-two tile of 4 or more divides it)"
    return None


def _kernel(factors_ref, q_ref, k_ref, v_ref, kv_ref, o_ref, out_ref, *, layer_ref=None):
    """One (V tile, head, row): S' = γ S + kᵀ v over [K, BV], o = (q S') r."""
    f32 = jnp.float32
    if layer_ref is None:
        state = kv_ref[...].astype(f32)  # [K, BV]
    else:
        layer = layer_ref[0]
        state = kv_ref[layer].astype(f32)
    decay, scale = factors_ref[0], factors_ref[1]  # [BV] each (one value repeated)
    # A reset row's decay is 0 and its old state is dropped, whatever it holds (even inf or NaN).
    state = jnp.where(decay[None, :] > 0, decay[None, :] * state, 0.0)
    state = state + k_ref[...].astype(f32)[:, None] * v_ref[...].astype(f32)[None, :]
    o = jnp.sum(q_ref[...].astype(f32)[:, None] * state, axis=0) * scale  # [BV]
    o_ref[...] = o.astype(o_ref.dtype)
    if layer_ref is None:
        out_ref[...] = state.astype(out_ref.dtype)
    else:
        out_ref[layer] = state.astype(out_ref.dtype)


def _with_layer(factors_ref, layer_ref, *refs):
    _kernel(factors_ref, *refs, layer_ref=layer_ref)


def launch(factors, q, k, v, kv, layer=None, *, interpret: bool = False):
    """The kernel call: (o [B, H, V], the new state, written over ``kv``).

    Args:
        factors: [B, H, 2, BV] float32 from ``factors`` (its last axis sets the V tile).
        q, k: [B, H, K]; v: [B, H, V]; kv: [B, H, K, V], or [L, B, H, K, V] with ``layer`` [1] int32.
    """
    block_v = factors.shape[-1]
    batch, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    tiles = value_dim // block_v
    vector = pl.BlockSpec((None, None, key_dim), lambda t, h, b: (b, h, 0))
    column = pl.BlockSpec((None, None, block_v), lambda t, h, b: (b, h, t))
    factor = pl.BlockSpec((None, None, 2, block_v), lambda t, h, b: (b, h, 0, 0))
    if layer is None:
        state = pl.BlockSpec((None, None, key_dim, block_v), lambda t, h, b: (b, h, 0, t))
        body, extra, extra_specs = _kernel, (), []
    else:  # every layer of the tile's columns is in the block; the kernel indexes its layer
        layers = kv.shape[0]
        state = pl.BlockSpec((layers, None, None, key_dim, block_v), lambda t, h, b: (0, b, h, 0, t))
        body, extra, extra_specs = _with_layer, (layer,), [pl.BlockSpec((1,), lambda t, h, b: (0,))]
    params = {} if interpret else dict(compiler_params=common.compiler_params(NUM_WARPS, 1))
    aliased = 1 + len(extra) + 3  # the state's operand index (factors, [layer], q, k, v, kv)
    return pl.pallas_call(
        body,
        out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(kv.shape, kv.dtype)],
        grid=(tiles, heads, batch),
        in_specs=[factor, *extra_specs, vector, vector, column, state],
        out_specs=[column, state],
        input_output_aliases={aliased: 1},
        interpret=interpret,
        **params,
    )(factors, *extra, q, k, v, kv)


def decode_step(
    q,
    k,
    v,
    log_decay,
    kv,
    count,
    *,
    normalize: bool = True,
    reset=None,
    layer=None,
    block_v: int = BLOCK_V,
    interpret: bool = False,
):
    """One token of retention through the kernel, updating the state in place.

    Args:
        q, k: [B, H, K]; v: [B, H, V] (bfloat16, float16 or float32, one dtype); log_decay: [H] float32.
        kv: the state, float32 or bfloat16: [B, H, K, V], or every layer's [L, B, H, K, V] with ``layer``.
        count: [B] int32, the tokens each row has seen (its position; negative: pads, which take the
            factor of position 0).
        normalize: multiply o by 1/sqrt(c_n) at the row's position.
        reset: [B] bool or None: rows where this token starts a new document (state emptied first).
        layer: None, or the int32 index (traced or not) of the layer of ``kv`` [L, ...] to update.
        block_v: the widest V tile (``value_tile``).
        interpret: run through the Pallas interpreter (any backend; for tests).

    Returns:
        (o [B, H, V] in the input dtype, the new state: ``kv``'s shape and dtype, written over ``kv``).
        The caller advances the count (reset rows restart it at 0).
    """
    batch, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    why = unsupported(key_dim, value_dim, q.dtype, kv.dtype)
    if why is not None:
        raise ValueError(f"decode_step: the kernel cannot run {why}; use the XLA form.")
    scalars = factors(log_decay, count, value_dim, normalize=normalize, reset=reset, block_v=block_v)
    if layer is not None:
        layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    return launch(scalars, q, k, v, kv, layer, interpret=interpret)


def factors(log_decay, count, value_dim: int, *, normalize: bool, reset=None, block_v: int = BLOCK_V):
    """The rows' scalars as the kernel takes them: [B, H, 2, BV] float32, (decay, row factor) per row and
    head, each repeated over the V tile (``value_tile``). A reset row's decay is 0 and its row factor
    that of position 0."""
    batch, heads = count.shape[0], log_decay.shape[0]
    tile = value_tile(value_dim, block_v)
    log_decay = log_decay.astype(jnp.float32)
    decay = jnp.broadcast_to(jnp.exp(log_decay), (batch, heads))  # [B, H]
    if reset is not None:
        decay = jnp.where(reset[:, None], 0.0, decay)
        count = jnp.where(reset, 0, count)
    if normalize:
        scale = retention.row_factors(count, log_decay)  # [B, H]
    else:
        scale = jnp.ones((batch, heads), jnp.float32)
    return jnp.broadcast_to(jnp.stack([decay, scale], -1)[..., None], (batch, heads, 2, tile))
