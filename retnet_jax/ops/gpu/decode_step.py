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

``joined_step`` is the same step taken straight from the layer's joined q/k/v/g projection (each head's
q | k | v | g, one contiguous run of 2K + 2V values, ``nn.projection.FusedProjection``), or from the
float32 partials [S, ...] of a product that split its D, summed in the kernel. The kernel then also does
what XLA did between the product and the step (three kernels: the rotation of q, that of k, the split):
it scales k by K^-1/2 (folded into v: kᵀ(cv) = (ck)ᵀv; c = 0 for a pad row, which never enters the
state), and rotates q and k by the row's position. A rotation acts on pairs of features (x_a, x_b), so
the kernel works on the two halves of each pair, of q, k and of the state's K rows alike,

    S'_a = γ S_a + k'_aᵀ v,   S'_b = γ S_b + k'_bᵀ v,   o = (q'_a S'_a + q'_b S'_b) · r,
    x'_a = x_a cos − x_b sin,  x'_b = x_b cos + x_a sin,

which needs no permutation in registers: the halves are strided loads ("interleaved": the even and odd
features, a stride of 2) or contiguous ones ("rotate_half", "none"). cos and sin per row [B, 2, K/2] are
computed in XLA from the positions, as the factors are.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from retnet_jax.ops import retention, rotation
from retnet_jax.ops.gpu import common

__all__ = [
    "BLOCK_V",
    "ROTATIONS",
    "STATE_DTYPES",
    "decode_step",
    "factors",
    "joined_factors",
    "joined_step",
    "joined_unsupported",
    "launch",
    "launch_joined",
    "rotation_factors",
    "unsupported",
    "value_tile",
]

# Widest V tile a program takes: 32 float32 columns are a 128-byte run per row of the tile (one cache
# line), and keep 128 programs at B = 1 for H8 V512. A [256, 32] float32 tile is 64 values per thread at
# 4 warps: it stays in registers.
BLOCK_V = 32
NUM_WARPS = 4

# What the state may be stored in (the kernel always computes in float32).
STATE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

# The rotations ``joined_step`` applies itself (``ops.rotation``'s styles, and none).
ROTATIONS = (*rotation.STYLES, "none")


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


def _kernel_with_layer(factors_ref, layer_ref, *refs):
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
        body, extra, extra_specs = _kernel_with_layer, (layer,), [pl.BlockSpec((1,), lambda t, h, b: (0,))]
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


# ------------------------------------------------------------------------------------------------------
# The step from the joined projection: split, k's scale, pads and rotation in the kernel.


def joined_unsupported(key_dim: int, value_dim: int, dtype, state_dtype, rotation_kind: str) -> str | None:
    """Why ``joined_step`` cannot run these shapes, dtypes and rotation, or None when it can."""
    why = unsupported(key_dim, value_dim, dtype, state_dtype)
    if why is not None:
        return why
    if rotation_kind not in ROTATIONS:
        return f"with rotation {rotation_kind!r} (it applies {ROTATIONS})"
    if key_dim < 2:
        return f"at K = {key_dim} (the rotation's pairs need K >= 2)"
    return None


def _halves(key_dim: int, rotation_kind: str):
    """The two halves of each pair of features as (start, stride): even and odd features for the
    interleaved pairs, the first and second halves otherwise."""
    if rotation_kind == "interleaved":
        return (0, 2), (1, 2)
    return (0, 1), (key_dim // 2, 1)


def _rows(start, size: int, stride: int):
    return pl.ds(start, size) if stride == 1 else pl.ds(start, size, stride)


def _joined_kernel(*refs, key_dim: int, rotation_kind: str, splits: int | None, dtype, stacked: bool):
    """One (V tile, head, row) of the step from the joined projection (see the module docstring)."""
    refs = list(refs)
    factors_ref = refs.pop(0)
    angles_ref = refs.pop(0) if rotation_kind != "none" else None
    layer = refs.pop(0)[0] if stacked else None
    x_ref, kv_ref, o_ref, out_ref = refs
    f32 = jnp.float32
    half, block_v = key_dim // 2, o_ref.shape[-1]

    def load(index):
        """A run of the joined row in float32: the product's output, or its partials summed and rounded
        to the compute dtype (the product's output as XLA would hand it over)."""
        if splits is None:
            return x_ref[index].astype(f32)
        # S is small (a few slices of D): unrolled. (An array index: the interpreter takes no Python int
        # beside a strided slice.)
        total = x_ref[jnp.int32(0), index]
        for s in range(1, splits):
            total = total + x_ref[jnp.int32(s), index]
        return total.astype(dtype).astype(f32)

    (a, stride), (b, _) = _halves(key_dim, rotation_kind)
    q_a, q_b = load(_rows(a, half, stride)), load(_rows(b, half, stride))  # [K/2] each
    k_a, k_b = load(_rows(key_dim + a, half, stride)), load(_rows(key_dim + b, half, stride))
    v = load(pl.ds(2 * key_dim + pl.program_id(0) * block_v, block_v))  # [BV]
    decay, scale, key_scale = factors_ref[0], factors_ref[1], factors_ref[2]  # [BV] each (one value)
    v = v * key_scale  # kᵀ(c v) = (c k)ᵀ v: K^-1/2, or 0 for a pad row
    if angles_ref is not None:
        cos, sin = angles_ref[0], angles_ref[1]  # [K/2] each
        q_a, q_b = q_a * cos - q_b * sin, q_b * cos + q_a * sin
        k_a, k_b = k_a * cos - k_b * sin, k_b * cos + k_a * sin

    def state_index(start):
        rows = _rows(start, half, stride)
        return (rows, slice(None)) if layer is None else (layer, rows, slice(None))

    o = jnp.zeros((block_v,), f32)
    for start, q, k in ((a, q_a, k_a), (b, q_b, k_b)):
        index = state_index(start)
        state = kv_ref[index].astype(f32)  # [K/2, BV]
        # A reset row's decay is 0 and its old state is dropped, whatever it holds (even inf or NaN).
        state = jnp.where(decay[None, :] > 0, decay[None, :] * state, 0.0) + k[:, None] * v[None, :]
        o = o + jnp.sum(q[:, None] * state, axis=0)
        out_ref[index] = state.astype(out_ref.dtype)
    o_ref[...] = (o * scale).astype(o_ref.dtype)


def launch_joined(
    factors,
    angles,
    joined,
    kv,
    layer=None,
    *,
    key_dim: int,
    rotation_kind: str,
    dtype=None,
    interpret: bool = False,
):
    """The kernel call of the step from the joined projection: (o [B, H, V], the new state over ``kv``).

    Args:
        factors: [B, H, 3, BV] float32 from ``joined_factors`` (its last axis sets the V tile).
        angles: [B, 2, K/2] float32 from ``rotation_factors`` (cos, sin), or None for rotation "none".
        joined: [B, H, 2K + 2V] (each head's q | k | v | g), or float32 partials [S, B, H, 2K + 2V].
        kv: [B, H, K, V], or [L, B, H, K, V] with ``layer`` [1] int32.
        key_dim: K. rotation_kind: one of ``ROTATIONS``.
        dtype: o's dtype, and the one partials are rounded to once summed (default: ``joined``'s).
    """
    block_v = factors.shape[-1]
    splits = None if joined.ndim == 3 else joined.shape[0]
    batch, heads, width = joined.shape[-3:]
    value_dim = (width - 2 * key_dim) // 2
    dtype = jnp.dtype(dtype or joined.dtype)
    column = pl.BlockSpec((None, None, block_v), lambda t, h, b: (b, h, t))
    factor = pl.BlockSpec((None, None, 3, block_v), lambda t, h, b: (b, h, 0, 0))
    if splits is None:  # the whole joined row of the head; the kernel reads its runs
        row = pl.BlockSpec((None, None, width), lambda t, h, b: (b, h, 0))
    else:
        row = pl.BlockSpec((splits, None, None, width), lambda t, h, b: (0, b, h, 0))
    operands, specs = [factors], [factor]
    if rotation_kind != "none":
        operands.append(angles)
        specs.append(pl.BlockSpec((None, 2, key_dim // 2), lambda t, h, b: (b, 0, 0)))
    if layer is None:
        state = pl.BlockSpec((None, None, key_dim, block_v), lambda t, h, b: (b, h, 0, t))
    else:  # every layer of the tile's columns is in the block; the kernel indexes its layer
        state = pl.BlockSpec((kv.shape[0], None, None, key_dim, block_v), lambda t, h, b: (0, b, h, 0, t))
        operands.append(layer)
        specs.append(pl.BlockSpec((1,), lambda t, h, b: (0,)))
    body = functools.partial(
        _joined_kernel,
        key_dim=key_dim,
        rotation_kind=rotation_kind,
        splits=splits,
        dtype=dtype,
        stacked=layer is not None,
    )
    params = {} if interpret else dict(compiler_params=common.compiler_params(NUM_WARPS, 1))
    return pl.pallas_call(
        body,
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads, value_dim), dtype),
            jax.ShapeDtypeStruct(kv.shape, kv.dtype),
        ],
        grid=(value_dim // block_v, heads, batch),
        in_specs=[*specs, row, state],
        out_specs=[column, state],
        input_output_aliases={len(operands) + 1: 1},
        interpret=interpret,
        **params,
    )(*operands, joined, kv)


def rotation_factors(positions, key_dim: int, rotation_kind: str, base: float = 10000.0):
    """cos and sin of each row's angles as the kernel takes them: [B, 2, K/2] float32 for positions [B]
    (``ops.rotation.rotate``'s angles, computed as it computes them in float32), or None for "none"."""
    if rotation_kind == "none":
        return None
    theta = jnp.asarray(rotation.angles(key_dim, rotation_kind, base), jnp.float32)  # [K/2]
    phase = positions.astype(jnp.float32)[:, None] * theta  # [B, K/2]
    return jnp.stack([jnp.cos(phase), jnp.sin(phase)], axis=1)


def joined_factors(
    log_decay, count, key_dim: int, value_dim: int, *, normalize: bool, reset=None, block_v: int = BLOCK_V
):
    """``factors`` and a third scalar per row, the factor of k: K^-1/2, or 0 for a pad row (a negative
    position after any reset): [B, H, 3, BV] float32."""
    two = factors(log_decay, count, value_dim, normalize=normalize, reset=reset, block_v=block_v)
    position = count if reset is None else jnp.where(reset, 0, count)
    key_scale = jnp.where(position >= 0, key_dim**-0.5, 0.0).astype(jnp.float32)  # [B]
    key_scale = jnp.broadcast_to(key_scale[:, None, None, None], (*two.shape[:2], 1, two.shape[-1]))
    return jnp.concatenate([two, key_scale], axis=2)


def positions_of(count, reset=None):
    """The rows' positions for the rotation: the count, 0 where a row resets."""
    return count if reset is None else jnp.where(reset, 0, count)


def joined_step(
    joined,
    log_decay,
    kv,
    count,
    *,
    key_dim: int,
    rotation_kind: str = "interleaved",
    rotation_base: float = 10000.0,
    normalize: bool = True,
    reset=None,
    layer=None,
    dtype=None,
    block_v: int = BLOCK_V,
    interpret: bool = False,
):
    """One token of retention through the kernel from the layer's joined projection, in place.

    Args:
        joined: [B, H, 2K + 2V]: each head's q | k | v | g as the product made them (unscaled, unrotated),
            in bfloat16, float16 or float32; or the product's float32 partials [S, B, H, 2K + 2V].
        log_decay: [H] float32. kv: the state, float32 or bfloat16: [B, H, K, V], or every layer's
            [L, B, H, K, V] with ``layer``.
        count: [B] int32, each row's position (negative: a pad, whose k never enters the state).
        key_dim: K. rotation_kind, rotation_base: the rotation (``ROTATIONS``) and its base.
        normalize, reset, layer, block_v, interpret: as ``decode_step``.
        dtype: the compute dtype (o's; partials are rounded to it once summed); default ``joined``'s.

    Returns:
        (o [B, H, V], the new state written over ``kv``); g is ``joined[..., 2K + V:]``.
    """
    width = joined.shape[-1]
    value_dim = (width - 2 * key_dim) // 2
    dtype = jnp.dtype(dtype or joined.dtype)
    if width != 2 * key_dim + 2 * value_dim or value_dim < 1:
        raise ValueError(f"joined_step: the joined width {width} is not 2K + 2V with K = {key_dim}.")
    why = joined_unsupported(key_dim, value_dim, dtype, kv.dtype, rotation_kind)
    if why is not None:
        raise ValueError(f"joined_step: the kernel cannot run {why}; use the XLA form.")
    scalars = joined_factors(
        log_decay, count, key_dim, value_dim, normalize=normalize, reset=reset, block_v=block_v
    )
    angles = rotation_factors(positions_of(count, reset), key_dim, rotation_kind, rotation_base)
    if layer is not None:
        layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    return launch_joined(
        scalars,
        angles,
        joined,
        kv,
        layer,
        key_dim=key_dim,
        rotation_kind=rotation_kind,
        dtype=dtype,
        interpret=interpret,
    )
