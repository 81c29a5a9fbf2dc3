"""Chunk retention with the chunk states in device memory: the kernels for wide heads (any K, V).

A [K, V] state of the paper's heads (256 × 512 float32) does not fit one program's registers, and tiles of
it that each walk the whole sequence (``chunk_retention``) re-read their inputs once per tile. Here the
work is split in two kinds of pass (chunk g, rows i / j, decays of ``common``):

* state passes walk the chunks of one (batch row, head, key tile, value tile) in order and write the state
  entering every chunk, h[B, H, G, K, V] (in the input dtype; the final state in float32):

      h_0 = h0,   h_{g+1} = chunk · h_g + (K_g ⊙ key)ᵀ V_g,   ht = h_G

* chunk passes run one program per (chunk, column tile), all chunks at once, and read h_g:

      o_g = ((Q Kᵀ) ⊙ D) V + (Q ⊙ query) h_g

The backward recomputes h (cheaper than keeping it: h holds K·V/C values per token, 2,048 at the
paper's heads and C = 64, against 2K + V = 1,024 for q, k, v), then walks the chunks in reverse for
the state gradients dh[g] = ∂L/∂h_{g+1}:

      dh[G−1] = dht,   dh[g−1] = chunk_g · dh[g] + (Q_g ⊙ query)ᵀ dO_g,   dh0 = the same step from dh[0]

and then, in parallel over chunks,

      dq_g = ((dO Vᵀ) ⊙ D) K + (dO h_gᵀ) ⊙ query      (per key tile, a loop over value tiles)
      dk_g = ((dO Vᵀ) ⊙ D)ᵀ Q + (V dh[g]ᵀ) ⊙ key       (the same program)
      dv_g = ((Q Kᵀ) ⊙ D)ᵀ dO + (K dh[g]) ⊙ key         (per value tile, a loop over key tiles)

The chunk passes recompute the C×C scores once per column tile; the tiles trade that against parallelism.
Inputs arrive padded (``fused``): T to a multiple of C, K and V to multiples of their tiles. With packed
documents every pass also takes the document starts (``first``: the batch row's in the state passes, the
chunk's in the chunk passes) and derives each chunk's decay factors from them (``common.decays``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from retnet_jax.ops.gpu import common
from retnet_jax.ops.gpu.common import dot

__all__ = ["Tiles", "backward", "default_tiles", "forward", "shared_memory"]


class Tiles(NamedTuple):
    """Tile widths and Triton's launch parameters of the split kernels."""

    key: int  # BK: key columns of a state tile, and the step of the loops over K (power of two >= 16)
    value: int  # BV: value columns of a state tile, and the step of the loops over V
    num_warps: int = 4
    num_stages: int = 2  # software-pipelining stages of every kernel's loop


def default_tiles(key_dim: int, value_dim: int) -> Tiles:
    """64-wide tiles, narrower only for narrow heads, 4 warps, 3 stages: at the paper's heads (H8 K256
    V512, B8 T8192, C64, bf16 fwd+bwd, H200 2026-12-01) 7.69 ms, against 8.24 with 2 stages, 7.70 with
    64×128 tiles and 9.94 with 8 warps."""
    return Tiles(
        key=min(64, common.next_power_of_two(key_dim)),
        value=min(64, common.next_power_of_two(value_dim)),
        num_stages=3,
    )


def shared_memory(tiles: Tiles, size: int, key_dim: int, value_dim: int, itemsize: int) -> dict[str, int]:
    """Estimated shared memory (bytes) of each kernel's program: the loads of one loop step times the
    stages, plus the register-made product operands (state tiles, masked scores, decayed rows)."""
    bk, bv, c, s = tiles.key, tiles.value, size, tiles.num_stages
    tile = bk * bv
    out = {
        "states": s * c * (bk + bv) + tile + c * bk,
        "output": s * (2 * c * bk + tile) + c * bv + 2 * c * c + c * bk,
        "dstates": s * c * (bk + bv) + tile + c * bk,
        "dqk": s * (2 * c * bv + 2 * tile) + 2 * c * bk + 2 * c * c,
        "dv": s * (2 * c * bk + tile) + c * bv + 2 * c * c + c * bk,
    }
    return {name: n * itemsize for name, n in out.items()}


# ----------------------------------------------------------------------------------------------
# State passes: grid (key tile · value tile, H, B).


def _states_kernel(
    lam_ref, k_ref, v_ref, h0_ref, h_ref, ht_ref, *, size, groups, length, precision, first_ref=None
):
    lam = lam_ref[...].astype(jnp.float32)

    def step(g, state):  # h_g [BK, BV] float32
        h_ref[g] = state.astype(h_ref.dtype)
        d = common.decays(
            lam, size, common.chunk_length(g, size, length), start=common.local_starts(first_ref, g, size)
        )
        k, v = k_ref[common.rows(g, size), :], v_ref[common.rows(g, size), :]
        return d.chunk * state + dot((k * d.key).astype(k.dtype), v, (0, 0), precision)

    ht_ref[...] = jax.lax.fori_loop(0, groups, step, h0_ref[...])


def _dstates_kernel(
    lam_ref, q_ref, do_ref, dht_ref, dh_ref, dh0_ref, *, size, groups, length, precision, first_ref=None
):
    lam = lam_ref[...].astype(jnp.float32)

    def step(t, dstate):  # ∂L/∂h_{g+1} [BK, BV] float32
        g = groups - 1 - t
        dh_ref[g] = dstate.astype(dh_ref.dtype)
        d = common.decays(
            lam, size, common.chunk_length(g, size, length), start=common.local_starts(first_ref, g, size)
        )
        q, do = q_ref[common.rows(g, size), :], do_ref[common.rows(g, size), :]
        return d.chunk * dstate + dot((q * d.query).astype(q.dtype), do, (0, 0), precision)

    dh0_ref[...] = jax.lax.fori_loop(0, groups, step, dht_ref[...])


def _state_pass(kernel, x, y, start, out_dtype, log_decay, first, size, length, tiles, interpret):
    """Runs a state pass over x [B, T, H, K] and y [B, T, H, V] from ``start`` [B, H, K, V] float32:
    (every chunk's state [B, H, G, K, V] in ``out_dtype``, the last state [B, H, K, V] float32)."""
    batch, padded, heads, key_dim = x.shape
    value_dim = y.shape[-1]
    bk, bv = tiles.key, tiles.value
    nv = value_dim // bv
    groups = padded // size
    state = pl.BlockSpec((None, None, bk, bv), lambda t, h, b: (b, h, t // nv, t % nv))
    static = dict(size=size, groups=groups, length=length, precision=common.precision_of(x.dtype))
    documents = [] if first is None else [pl.BlockSpec((None, padded), lambda t, h, b: (b, 0))]
    call = common.launch(
        common.kernel_body(kernel, first is not None, **static),
        ((key_dim // bk) * nv, heads, batch),
        [
            pl.BlockSpec((None, size), lambda t, h, b: (h, 0)),
            *documents,
            pl.BlockSpec((None, padded, None, bk), lambda t, h, b: (b, 0, h, t // nv)),
            pl.BlockSpec((None, padded, None, bv), lambda t, h, b: (b, 0, h, t % nv)),
            state,
        ],
        [
            jax.ShapeDtypeStruct((batch, heads, groups, key_dim, value_dim), out_dtype),
            jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32),
        ],
        [
            pl.BlockSpec((None, None, groups, bk, bv), lambda t, h, b: (b, h, 0, t // nv, t % nv)),
            state,
        ],
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        interpret=interpret,
    )
    return call(common.head_decays(log_decay, size), *([] if first is None else [first]), x, y, start)


# ----------------------------------------------------------------------------------------------
# Chunk passes: grid (column tile, G, H, B); every program reads one chunk.


def _chunk_decays(lam_ref, size, length, first_ref):
    """The decay factors of this program's chunk (grid axis 1); ``first_ref`` [C]: its document starts."""
    lam = lam_ref[...].astype(jnp.float32)
    g = pl.program_id(1)
    start = common.local_starts(first_ref, g, size)
    return common.decays(lam, size, common.chunk_length(g, size, length), common.decay_mask(lam, size), start)


def _output_kernel(
    lam_ref, q_ref, k_ref, v_ref, h_ref, o_ref, *, size, length, key_tile, precision, first_ref=None
):
    d = _chunk_decays(lam_ref, size, length, first_ref)
    bv = v_ref.shape[-1]

    def step(t, carry):  # over key tiles: the scores and the entering state's term
        scores, cross = carry
        cols = common.columns(t, key_tile)
        q, k = q_ref[:, cols], k_ref[:, cols]
        scores = scores + dot(q, k, (1, 1), precision)
        q_decayed = (q * d.query).astype(q.dtype)
        return scores, cross + dot(q_decayed, h_ref[cols, :].astype(q.dtype), (1, 0), precision)

    init = (jnp.zeros((size, size), jnp.float32), jnp.zeros((size, bv), jnp.float32))
    scores, cross = jax.lax.fori_loop(0, q_ref.shape[-1] // key_tile, step, init)
    v = v_ref[...]
    o = dot((scores * d.mask).astype(v.dtype), v, (1, 0), precision) + cross
    o_ref[...] = o.astype(o_ref.dtype)


def _dqk_kernel(
    lam_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    h_ref,
    dh_ref,
    dq_ref,
    dk_ref,
    *,
    size,
    length,
    value_tile,
    precision,
    first_ref=None,
):
    d = _chunk_decays(lam_ref, size, length, first_ref)
    bk = q_ref.shape[-1]

    def step(t, carry):  # over value tiles: dO Vᵀ and the state terms
        dscores, dq, dk = carry
        cols = common.columns(t, value_tile)
        v, do = v_ref[:, cols], do_ref[:, cols]
        dscores = dscores + dot(do, v, (1, 1), precision)
        dq = dq + dot(do, h_ref[:, cols].astype(do.dtype), (1, 1), precision)
        dk = dk + dot(v, dh_ref[:, cols].astype(v.dtype), (1, 1), precision)
        return dscores, dq, dk

    zeros = jnp.zeros((size, bk), jnp.float32)
    init = (jnp.zeros((size, size), jnp.float32), zeros, zeros)
    dscores, dq, dk = jax.lax.fori_loop(0, v_ref.shape[-1] // value_tile, step, init)
    q, k = q_ref[...], k_ref[...]
    dscores = (dscores * d.mask).astype(q.dtype)
    dq_ref[...] = (dq * d.query + dot(dscores, k, (1, 0), precision)).astype(dq_ref.dtype)
    dk_ref[...] = (dk * d.key + dot(dscores, q, (0, 0), precision)).astype(dk_ref.dtype)


def _dv_kernel(
    lam_ref, q_ref, k_ref, do_ref, dh_ref, dv_ref, *, size, length, key_tile, precision, first_ref=None
):
    d = _chunk_decays(lam_ref, size, length, first_ref)
    bv = do_ref.shape[-1]

    def step(t, carry):  # over key tiles: Q Kᵀ and the state term
        scores, inter = carry
        cols = common.columns(t, key_tile)
        q, k = q_ref[:, cols], k_ref[:, cols]
        scores = scores + dot(q, k, (1, 1), precision)
        return scores, inter + dot(k, dh_ref[cols, :].astype(k.dtype), (1, 0), precision)

    init = (jnp.zeros((size, size), jnp.float32), jnp.zeros((size, bv), jnp.float32))
    scores, inter = jax.lax.fori_loop(0, q_ref.shape[-1] // key_tile, step, init)
    do = do_ref[...]
    dv = dot((scores * d.mask).astype(do.dtype), do, (0, 0), precision) + inter * d.key
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _chunk_pass(kernel, ins, outs, tiled: str, log_decay, first, size, length, tiles, interpret):
    """Runs a chunk pass. ``ins`` / ``outs``: (array or output shape, kind) with kind "seq" ([B, T, H, ·],
    all columns), "seq tile" (its column tile), "state" ([B, H, G, K, V], the chunk's rows and the column
    tile) or "state rows" (the chunk's key-tile rows, all value columns); ``tiled`` names the width
    ("key" or "value") whose tiles the grid runs over."""
    x = ins[0][0]
    batch, padded, heads = x.shape[:3]
    key_dim = x.shape[-1]
    tile = tiles.key if tiled == "key" else tiles.value
    width = next(a.shape[-1] for a, kind in ins if kind == "seq tile")
    groups = padded // size

    def spec(shape, kind):
        if kind == "seq":
            return pl.BlockSpec((None, size, None, shape[-1]), lambda t, g, h, b: (b, g, h, 0))
        if kind == "seq tile":
            return pl.BlockSpec((None, size, None, tile), lambda t, g, h, b: (b, g, h, t))
        if kind == "state":  # [K, BV] of chunk g
            return pl.BlockSpec((None, None, None, shape[-2], tile), lambda t, g, h, b: (b, h, g, 0, t))
        return pl.BlockSpec((None, None, None, tile, shape[-1]), lambda t, g, h, b: (b, h, g, t, 0))

    step = dict(key_tile=tiles.key) if tiled == "value" else dict(value_tile=tiles.value)
    del key_dim
    static = dict(size=size, length=length, precision=common.precision_of(x.dtype), **step)
    documents = [] if first is None else [pl.BlockSpec((None, size), lambda t, g, h, b: (b, g))]
    call = common.launch(
        common.kernel_body(kernel, first is not None, **static),
        (width // tile, groups, heads, batch),
        [pl.BlockSpec((None, size), lambda t, g, h, b: (h, 0)), *documents]
        + [spec(a.shape, kind) for a, kind in ins],
        [o for o, _ in outs],
        [spec(o.shape, kind) for o, kind in outs],
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        interpret=interpret,
    )
    return call(
        common.head_decays(log_decay, size), *([] if first is None else [first]), *(a for a, _ in ins)
    )


# ----------------------------------------------------------------------------------------------
# The two directions.


def _states(k, v, log_decay, h0, first, size, length, tiles, interpret):
    return _state_pass(_states_kernel, k, v, h0, v.dtype, log_decay, first, size, length, tiles, interpret)


def forward(q, k, v, log_decay, h0, first=None, *, size: int, length: int, tiles: Tiles, interpret: bool):
    """Unnormalized retention from the state h0: (o [B, T, H, V], final state [B, H, K, V] float32).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V], T a multiple of ``size``, K and V multiples of their tiles,
            zero past ``length`` tokens; log_decay: [H] float32; h0: [B, H, K, V] float32.
        first: [B, T] int32 or None: the index of each token's document start (−1: the document carried
            in), padded rows repeating the last real one (``common.decays``); None: no resets.
    """
    h, ht = _states(k, v, log_decay, h0, first, size, length, tiles, interpret)
    (o,) = _chunk_pass(
        _output_kernel,
        [(q, "seq"), (k, "seq"), (v, "seq tile"), (h, "state")],
        [(jax.ShapeDtypeStruct(v.shape, v.dtype), "seq tile")],
        "value",
        log_decay,
        first,
        size,
        length,
        tiles,
        interpret,
    )
    return o, ht


def backward(
    q, k, v, log_decay, h0, do, dht, first=None, *, size: int, length: int, tiles: Tiles, interpret: bool
):
    """Gradients (dq, dk, dv, dh0) of ``forward`` for the cotangents do [B, T, H, V] and dht [B, H, K, V]
    (float32)."""
    h, _ = _states(k, v, log_decay, h0, first, size, length, tiles, interpret)
    dh, dh0 = _state_pass(
        _dstates_kernel, q, do, dht, v.dtype, log_decay, first, size, length, tiles, interpret
    )
    chunk_pass = functools.partial(
        _chunk_pass,
        log_decay=log_decay,
        first=first,
        size=size,
        length=length,
        tiles=tiles,
        interpret=interpret,
    )
    dq, dk = chunk_pass(
        _dqk_kernel,
        [(q, "seq tile"), (k, "seq tile"), (v, "seq"), (do, "seq"), (h, "state rows"), (dh, "state rows")],
        [
            (jax.ShapeDtypeStruct(q.shape, q.dtype), "seq tile"),
            (jax.ShapeDtypeStruct(k.shape, k.dtype), "seq tile"),
        ],
        "key",
    )
    (dv,) = chunk_pass(
        _dv_kernel,
        [(q, "seq"), (k, "seq"), (do, "seq tile"), (dh, "state")],
        [(jax.ShapeDtypeStruct(v.shape, v.dtype), "seq tile")],
        "value",
    )
    return dq, dk, dv, dh0
